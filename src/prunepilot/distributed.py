"""Data-parallel calibration over processes (torchrun): each rank sees its share of the calibration samples,
every statistic is all-reduced, so every rank prunes the same weights the same way; only rank 0 writes.

    torchrun --nproc-per-node 2 -m prunepilot prune MODEL --method sparsegpt --sparsity 0.5 --out runs/x
    torchrun --nproc-per-node 2 -m prunepilot agent MODEL --target 0.45 --out runs/agent
    torchrun --nnodes 2 --node-rank R --master-addr HOST --master-port 29500 --nproc-per-node 8 -m prunepilot ...

Without torchrun (WORLD_SIZE unset or 1) every function here is the single-process identity.
Backend: nccl when the run uses CUDA, else gloo. A rank that fails ends with one error line; torchrun then stops
the other ranks, and nothing has been written (outputs are written by rank 0, atomically, at the end; the agent's
journal is the exception by design: its finished iterations stay, and `--resume` continues from them).
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist

from .errors import PrunepilotError


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if world_size() > 1 else 0


def is_main() -> bool:
    return rank() == 0


TORCHRUN_VARS = ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")  # what torchrun sets beside WORLD_SIZE


def env_world_size() -> int:
    """WORLD_SIZE from the environment (1 when unset), checked: a positive integer, and above 1 only with the other
    variables torchrun sets (WORLD_SIZE=2 in a plain shell used to hang or end in a traceback)."""
    raw = os.environ.get("WORLD_SIZE", "1").strip() or "1"
    if not raw.isdigit() or int(raw) < 1:
        raise PrunepilotError(f"WORLD_SIZE={raw!r} is not a positive integer (torchrun sets it; unset it to run as "
                              "one process)")
    missing = [v for v in TORCHRUN_VARS if not os.environ.get(v, "").strip()]
    if int(raw) > 1 and missing:
        raise PrunepilotError(f"WORLD_SIZE={raw} but {', '.join(missing)} unset: launch with torchrun, or unset "
                              "WORLD_SIZE to run as one process")
    return int(raw)


def init_from_env(device_type: str = "cpu") -> None:
    """Join the process group torchrun describes in the environment (no-op when not launched by torchrun)."""
    if env_world_size() <= 1 or dist.is_initialized():
        return
    backend = "nccl" if device_type == "cuda" else "gloo"
    dist.init_process_group(backend=backend)
    if device_type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))


def local_device(name: str | None) -> str | None:
    """The device this rank computes on: with CUDA and several ranks, cuda:LOCAL_RANK."""
    if world_size() > 1 and torch.cuda.is_available() and name in (None, "auto", "cuda"):
        return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    return name


def shard(ids: torch.Tensor) -> torch.Tensor:
    """This rank's share of the calibration samples (rows rank, rank + world, ...). ids: (n, seq)."""
    n = world_size()
    if n == 1:
        return ids
    if ids.shape[0] < n:
        raise PrunepilotError(f"{ids.shape[0]} calibration samples cannot be split over {n} processes")
    return ids[rank()::n]


def shard_list(items: list) -> list:
    """This rank's share of per-sample items (items rank, rank + world, ...), matching shard(ids)'s rows."""
    return items[rank()::world_size()] if world_size() > 1 else items


def all_reduce_(t: torch.Tensor) -> torch.Tensor:
    """Sum `t` over the ranks, in place (float64 sums are reduced as float64)."""
    if world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def total(x: float | int) -> float:
    """Sum of a number over the ranks."""
    if world_size() == 1:
        return x
    return all_reduce_(torch.tensor([float(x)], dtype=torch.float64)).item()


def broadcast(obj):
    """Rank 0's value of a picklable object, on every rank (e.g. a controller's decision)."""
    if world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier() -> None:
    """Wait until every rank is here (e.g. every rank has checked the output folder before rank 0 writes)."""
    if world_size() > 1:
        dist.barrier()


def summary(n_samples: int) -> dict:
    """What report.json records about the processes: how many, and how many calibration samples each saw."""
    n = world_size()
    return {"world_size": n, "samples_per_rank": [len(range(r, n_samples, n)) for r in range(n)]}
