"""Statistics gathering: one block pass recording the input moments of the output projections whose input
columns are the removable units (down_proj for MLP channels, o_proj for heads; each MoE expert's down_proj on
the tokens routed to it), pooled in one RunningMoments or kept per calibration domain (DomainMoments)."""
from __future__ import annotations

from dataclasses import dataclass, field

from ..data import Calibration
from ..engine import BlockPass, ExpertMatrix, blocks
from ..engine.layout import MoEParts, linear
from ..moments import DomainMoments, Moments, RunningMoments
from .budget import Ledger
from .options import StructuredOptions


@dataclass
class Domains:
    """Each calibration row's domain and the domain weights when statistics are fused per domain (tags None:
    pooled statistics)."""
    tags: list[str] | None = None
    weights: dict[str, float] = field(default_factory=dict)

    @classmethod
    def of(cls, options: StructuredOptions, cal: Calibration) -> "Domains":
        """domain_stats "fused": per-domain statistics when the calibration rows carry their domains (given
        token ids do not: one domain, for which fused and pooled are the same statistic)."""
        if options.domain_stats == "fused" and cal.domains:
            return cls(cal.domains, cal.weights)
        return cls()


def output_projections(ledger: Ledger, i: int) -> dict:
    """The output projections whose inputs are observed: {"mlp": down_proj, "attn": o_proj}; an MoE block's
    experts as {"mlp.<e>": expert e's down_proj} (statistics of the tokens routed to e)."""
    block, lay = ledger.adapter.blocks[i], ledger.layouts[i]
    out = {}
    if "mlp" in ledger.kinds and isinstance(lay.mlp, MoEParts):
        experts = block.get_submodule(lay.mlp.experts)
        out.update({f"mlp.{e}": ExpertMatrix(experts, "down_proj", e) for e in range(experts.down_proj.shape[0])})
    elif "mlp" in ledger.kinds:
        out["mlp"] = linear(block, lay.mlp.out)
    if "attn" in ledger.kinds:
        out["attn"] = linear(block, lay.attn.o)
    return out


def observe(ledger: Ledger, ids, device, domains: Domains, outputs: str, desc: str, batch_size: int) -> BlockPass:
    """The block pass (engine.blocks); each block's states: {name: Moments} of output_projections. Per domain,
    the pass tells each DomainMoments the domain of the batch it is fed."""
    def state(name, lin) -> Moments:
        if domains.tags is None:
            return RunningMoments(lin.in_features, device)
        return DomainMoments(lin.in_features, domains.weights, lambda: bp.tag, device)

    bp = blocks(ledger.adapter, ids, device, linears=lambda i, block: output_projections(ledger, i), states=state,
                outputs=outputs, batch_size=batch_size, desc=desc, tags=domains.tags)
    return bp
