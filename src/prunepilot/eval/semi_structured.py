"""`prunepilot eval --speed --semi-structured`: run 2:4-pruned linears as torch semi-structured sparse tensors.

A 2:4 model saved by prunepilot is dense on disk and runs at dense speed: zeros are multiplied like any
other weight. torch.sparse.to_sparse_semi_structured (cuSPARSELt / CUTLASS kernels, NVIDIA GPUs of compute
capability 8.0 and later) stores only the two kept values of every group of four plus their positions, and its
matmul skips the rest; this module swaps each qualifying nn.Linear weight for such a tensor, as in PyTorch's
semi-structured sparsity tutorial:  linear.weight = nn.Parameter(to_sparse_semi_structured(linear.weight)).

Guards (one-line PrunepilotError each): a CUDA device, float16 or bfloat16 weights, and at least one linear
that is 2:4 (at most 2 non-zeros in every group of 4 consecutive input weights). Linears that are not 2:4
(lm_head, unpruned layers) stay dense; 2:4 ones whose shape the kernels cannot take (rows a multiple of 32,
columns of 64 for 16-bit types) stay dense too, and are counted.
"""
from __future__ import annotations

import logging

import torch
from torch import nn

from ..errors import PrunepilotError
from ..modelfiles import parse_dtype

log = logging.getLogger(__name__)

DTYPES = (torch.float16, torch.bfloat16)


def check_semi_structured_args(speed: bool, device, dtype) -> None:
    """The flags' own guards, before a model is loaded."""
    if not speed:
        raise PrunepilotError("--semi-structured applies to --speed; give --speed")
    if torch.device(device).type != "cuda":
        raise PrunepilotError(f"--semi-structured needs a CUDA GPU (torch.sparse.to_sparse_semi_structured runs on "
                              f"NVIDIA compute capability 8.0+), not {device}")
    if parse_dtype(dtype) not in DTYPES:
        raise PrunepilotError(f"--semi-structured needs --dtype float16 or bfloat16 (got {dtype})")


def is_2_4(weight: torch.Tensor) -> bool:
    """True when every group of 4 consecutive input weights of every row (out, in) has at most 2 non-zeros."""
    if weight.dim() != 2 or weight.shape[1] % 4:
        return False
    groups = weight.detach().reshape(weight.shape[0], -1, 4)
    return bool(((groups != 0).sum(-1) <= 2).all())


def _fits_kernels(weight: torch.Tensor) -> bool:
    from torch.sparse.semi_structured import SparseSemiStructuredTensorCUTLASS as Cutlass

    cfg = Cutlass._DTYPE_SHAPE_CONSTRAINTS.get(weight.dtype)
    rows, cols = weight.shape
    return cfg is not None and rows % cfg.sparse_min_rows == 0 and cols % cfg.sparse_min_cols == 0


def plan_semi_structured(model: nn.Module) -> tuple[list[str], list[str], list[str]]:
    """(2:4 linears the kernels take, 2:4 linears of unsupported shape, linears that are not 2:4).

    Raises PrunepilotError when no linear is 2:4."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    ok, bad_shape, dense = [], [], []
    for name, m in model.named_modules():
        if not isinstance(m, nn.Linear) or m is head:
            continue
        if not is_2_4(m.weight):
            dense.append(name)
        else:
            (ok if _fits_kernels(m.weight) else bad_shape).append(name)
    if not ok and not bad_shape:
        raise PrunepilotError("no linear layer is 2:4 sparse (at most 2 non-zeros in every group of 4 input "
                              "weights); prune with --pattern 2:4 first")
    if not ok:
        raise PrunepilotError(f"the {len(bad_shape)} 2:4 linears have shapes the semi-structured kernels do not "
                              f"take (e.g. {bad_shape[0]})")
    return ok, bad_shape, dense


def to_semi_structured(model: nn.Module) -> dict:
    """Swap every qualifying 2:4 nn.Linear weight for a SparseSemiStructuredTensor (in place); returns counts."""
    from torch.sparse import to_sparse_semi_structured

    p = next(model.parameters())
    check_semi_structured_args(True, p.device, p.dtype)
    ok, bad_shape, dense = plan_semi_structured(model)
    for name in ok:
        m = model.get_submodule(name)
        m.weight = nn.Parameter(to_sparse_semi_structured(m.weight.detach()), requires_grad=False)
    log.info("semi-structured: %d linears converted, %d of unsupported shape, %d not 2:4 (kept dense)",
             len(ok), len(bad_shape), len(dense))
    return {"converted": len(ok), "unsupported_shape": len(bad_shape), "not_2_4": len(dense),
            "not_2_4_examples": dense[:5], "kernel": "torch.sparse.to_sparse_semi_structured"}
