"""Fused per-domain statistics (structured.domain_stats): hand-computed fusion of two toy domains, fused == pooled
for one domain, the engine's per-sample tags, flap_iterative end to end on two token-id domains, clear errors."""
import json

import pytest
import torch

import prunepilot.job as job_module
from prunepilot.api import prune
from prunepilot.cli import _recipe_from_args, build_parser, main
from prunepilot.data import Calibration, calibration_split, domain_weights, TextSource
from prunepilot.engine import ModelAdapter, blocks
from prunepilot.engine.capture import tagged_batches
from prunepilot.errors import PrunepilotError
from prunepilot.recipe import Recipe
from prunepilot.moments import DomainMoments, RunningMoments
from prunepilot.testing.tiny_models import tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


def fed(weights: dict, batches: list[tuple[str, torch.Tensor]]) -> DomainMoments:
    now = {}
    m = DomainMoments(2, weights, lambda: now["d"])
    for d, x in batches:
        now["d"] = d
        m.add(x)
    return m


# two channels, two tokens per domain:  channel 0: a = [1, 3], b = [10, 14];  channel 1: a = [0, 2], b = [1, 1]
A = torch.tensor([[[1.0, 0.0], [3.0, 2.0]]])      # (batch 1, seq 2, dim 2)
B = torch.tensor([[[10.0, 1.0], [14.0, 1.0]]])


def test_fusion_by_hand_and_what_pooling_adds():
    m = fed({"a": 1, "b": 1}, [("a", A), ("b", B)])
    # μ_a = (2, 1), σ²_a = (2, 2); μ_b = (12, 1), σ²_b = (8, 0) (unbiased); w = (1/2, 1/2)
    assert m.n == 4
    assert m.mean.tolist() == [7.0, 1.0]
    assert m.var().tolist() == [5.0, 1.0]
    assert m.var(unbiased=False).tolist() == [2.5, 0.5]           # biased: σ²_a = (1, 1), σ²_b = (4, 0)
    # N · Σ w_k (Σx²)_k / n_k: 4 · (½·(1+9)/2 + ½·(100+196)/2), 4 · (½·4/2 + ½·2/2)
    assert m.sq_sum.tolist() == [306.0, 6.0]
    pooled = RunningMoments(2)
    pooled.add(A)
    pooled.add(B)
    assert pooled.mean.tolist() == [7.0, 1.0]                    # equal shares: the same mean
    # pooled biased variance = within (2.5) + between-domain spread ½(2-7)² + ½(12-7)² = 25 on channel 0
    assert pooled.var(unbiased=False).tolist() == [27.5, 0.5]
    torch.testing.assert_close(pooled.var(), torch.tensor([110 / 3, 2 / 3]))
    w = fed({"a": 1, "b": 3}, [("b", B), ("a", A)])              # weights 1:3, normalised to ¼, ¾
    assert w.mean.tolist() == [9.5, 1.0] and w.var().tolist() == [6.5, 0.5]


def test_single_domain_fused_is_pooled_exactly():
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(1, n, 2, generator=g) * 3 + 50 for n in (3, 1, 4)]
    fused = fed({"only": 2.0}, [("only", x) for x in xs])
    pooled = RunningMoments(2)
    for x in xs:
        pooled.add(x)
    for got, want in ((fused.mean, pooled.mean), (fused.var(), pooled.var()), (fused.sq_sum, pooled.sq_sum)):
        assert torch.equal(got, want)
    # a domain that saw no tokens drops out and the others are renormalised (an MoE expert a domain never reached)
    absent = fed({"a": 1, "b": 1, "never": 5}, [("a", A), ("b", B)])
    assert absent.mean.tolist() == [7.0, 1.0] and absent.var().tolist() == [5.0, 1.0]
    with pytest.raises(PrunepilotError, match="domain 'c' has no weight"):
        fed({"a": 1}, [("c", A)])


def test_tagged_batches_hold_one_domain():
    tags = ["a", "b", "a", "a", "b", "c", "a"]
    assert tagged_batches(tags, 1) == (list(range(7)), [(k, k + 1) for k in range(7)])
    order, spans = tagged_batches(tags, 2)
    assert order == [0, 2, 3, 6, 1, 4, 5]
    assert spans == [(0, 2), (2, 4), (4, 6), (6, 7)]
    assert all(len({tags[order[k]] for k in range(s, e)}) == 1 for s, e in spans)


@pytest.mark.parametrize("batch_size", [1, 3])
def test_block_pass_tells_each_batch_domain(batch_size):
    """Per-domain moments from one tagged pass equal a plain pass over that domain's rows alone."""
    model = tiny_model("llama")
    ids = torch.randint(3, 128, (6, 8), generator=torch.Generator().manual_seed(1))
    tags = ["x", "y", "x", "y", "y", "x"]
    adapter = ModelAdapter(model)
    down = lambda i, block: {"down": block.mlp.down_proj}  # noqa: E731

    def tagged(kind, lin):
        return DomainMoments(lin.in_features, {"x": 1, "y": 1}, lambda: bp.tag)

    bp = blocks(adapter, ids, "cpu", linears=down, states=tagged, tags=tags, batch_size=batch_size)
    got = [blk.states["down"].parts for blk in bp]
    for domain in ("x", "y"):
        rows = [r for r, t in enumerate(tags) if t == domain]
        plain = blocks(adapter, ids[rows], "cpu", linears=down, states=lambda k, lin: RunningMoments(lin.in_features))
        for parts, blk in zip(got, plain):
            assert parts[domain].n == blk.states["down"].n
            torch.testing.assert_close(parts[domain].mean, blk.states["down"].mean, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(parts[domain].var(), blk.states["down"].var(), rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="5 tags for 6 rows"):
        blocks(adapter, ids, "cpu", tags=tags[:5])


# ---------------------------------------------------------------------------------------------- pipeline

def two_domains(monkeypatch, shares=(1, 1), one=False):
    """Calibration drawn from two token-id 'domains' (low ids / high ids), shuffled like calibration_split."""
    g = torch.Generator().manual_seed(3)
    lo, hi = torch.randint(3, 60, (4, 16), generator=g), torch.randint(64, 128, (4, 16), generator=g)
    ids = torch.stack([lo[0], hi[0], hi[1], lo[1], lo[2], hi[2], hi[3], lo[3]])
    domains = ["lo", "hi", "hi", "lo", "lo", "hi", "hi", "lo"]
    if one:
        domains = ["lo"] * 8
    weights = {"lo": 1.0} if one else {"lo": shares[0] / sum(shares), "hi": shares[1] / sum(shares)}

    def fake(tok, sources, n, seqlen, seed):
        return Calibration(ids, torch.zeros(0, dtype=torch.long), {d: {"samples": domains.count(d)} for d in weights},
                           domains, weights)

    monkeypatch.setattr(job_module, "calibration_split", fake)
    return ids


def run(stats=None, batch_size=1, method="flap_iterative", arch="llama", **extra):
    model = tiny_model(arch)
    steps = {"steps": 2} if method == "flap_iterative" else {}  # one-shot methods refuse steps > 1
    structured = {**steps, **({"domain_stats": stats} if stats else {}), **extra}
    rep = prune(model, {"method": method, "sparsity": 0.4, "device": "cpu", "structured": structured,
                        "calibration": {"batch_size": batch_size, "n_samples": 8, "seqlen": 16}}, object())
    with torch.no_grad():
        out = model(torch.arange(3, 19)[None]).logits
    return rep, out


def test_flap_iterative_fuses_two_token_id_domains(monkeypatch):
    two_domains(monkeypatch)
    fused, out_fused = run()                                       # flap_iterative's default
    assert fused.extra["domain_stats"] == "fused" and fused.calibration["domain_stats"] == "fused"
    assert fused.calibration["domain_weights"] == {"lo": 0.5, "hi": 0.5}
    assert abs(fused.extra["achieved_sparsity"] - 0.4) < 0.02 and torch.isfinite(out_fused).all()
    pooled, out_pooled = run("pooled")
    assert pooled.extra["domain_stats"] == "pooled" and "domain_weights" not in pooled.calibration
    kept = lambda r: [(w["intermediate_size"], w["kept_kv_groups"]) for w in r.extra["layers"]]  # noqa: E731
    assert kept(fused) != kept(pooled) or not torch.equal(out_fused, out_pooled)  # the statistics differ
    grouped, out_grouped = run(batch_size=3)                       # batches split by domain: the same statistics
    assert kept(grouped) == kept(fused)
    torch.testing.assert_close(out_grouped, out_fused, rtol=1e-4, atol=1e-4)
    flap, _ = run(method="flap")                                   # one-shot FLAP keeps the pooled statistic
    assert flap.extra["domain_stats"] == "pooled"


@pytest.mark.parametrize("ratios", ["global", "uniform"])
def test_one_domain_fused_equals_pooled_end_to_end(monkeypatch, ratios):
    two_domains(monkeypatch, one=True)
    a, out_a = run("fused", ratios=ratios)
    b, out_b = run("pooled", ratios=ratios)
    assert a.extra["layers"] == b.extra["layers"]
    assert torch.equal(out_a, out_b)


def test_moe_experts_fuse_their_routed_tokens_per_domain(monkeypatch):
    """An expert's statistics are kept per domain too (the tokens of each domain routed to it)."""
    two_domains(monkeypatch, shares=(1, 3))
    rep, out = run(arch="qwen3_moe")
    assert rep.extra["domain_stats"] == "fused" and rep.calibration["domain_weights"] == {"lo": 0.25, "hi": 0.75}
    assert torch.isfinite(out).all() and rep.extra["achieved_sparsity"] > 0.3


def test_domain_weights_come_from_the_calib_weights():
    srcs = [TextSource("x", 1.0, "wiki"), TextSource("y", 3.0, "code"), TextSource("z", 1.0, "wiki")]
    assert domain_weights(srcs) == {"wiki": 0.4, "code": 0.6}


def test_calibration_split_labels_every_row(tmp_path):
    class Chars:
        def encode(self, text, add_special_tokens=False):
            return [ord(c) % 128 for c in text]

    (tmp_path / "a.txt").write_text("alpha " * 200)
    (tmp_path / "b.txt").write_text("beta! " * 200)
    cal = calibration_split(Chars(), [f"{tmp_path}/a.txt:1", f"{tmp_path}/b.txt:3"], 8, 16, seed=1)
    assert sorted(cal.domains) == ["a"] * 2 + ["b"] * 6 and cal.weights == {"a": 0.25, "b": 0.75}
    for row, d in zip(cal.ids, cal.domains):  # each row is text of its own domain
        assert set(row.tolist()) <= set(Chars().encode("alpha " if d == "a" else "beta! "))


def test_bad_domain_stats_is_one_line():
    with pytest.raises(PrunepilotError) as e:
        Recipe.from_dict({"method": "flap_iterative", "structured": {"domain_stats": "mean"}})
    assert "structured.domain_stats" in str(e.value) and "\n" not in str(e.value)
    args = build_parser().parse_args(["prune", "m", "--method", "flap", "--domain-stats", "fused", "--out", "x"])
    assert _recipe_from_args(args).structured.domain_stats == "fused"
    with pytest.raises(SystemExit):
        main(["prune", "m", "--domain-stats", "mean", "--out", "x"])


def test_fused_two_processes_equal_one(tmp_path):
    """torchrun: every domain's moments are all-reduced, so two ranks (each with half the rows) prune alike."""
    from conftest import shared_path
    from test_distributed import torchrun

    argv = ["prune", str(shared_path("models", "stories260K")), "--method", "flap_iterative", "--steps", "2",
            "--sparsity", "0.3", "--calib", "a=tinystories#0:400", "--calib", "b=tinystories#400:900:3",
            "--n-samples", "8", "--seqlen", "128", "--eval", "none", "--device", "cpu", "--no-save-model"]
    assert main([*argv, "--out", str(tmp_path / "one")]) == 0
    run = torchrun([*argv, "--out", str(tmp_path / "two")])
    assert run.returncode == 0, run.stderr[-2000:]
    one, two = (json.loads((tmp_path / d / "report.json").read_text()) for d in ("one", "two"))
    assert two["distributed"]["world_size"] == 2
    assert one["calibration"]["domain_weights"] == {"a": 0.25, "b": 0.75}
    assert one["extra"]["domain_stats"] == two["extra"]["domain_stats"] == "fused"
    widths = lambda r: [(w["intermediate_size"], w["kept_kv_groups"]) for w in r["extra"]["layers"]]  # noqa: E731
    assert widths(one) == widths(two)
