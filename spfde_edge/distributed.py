"""Data-parallel plumbing for ``torchrun``: process group, rank facts, small collectives.

A single process is the world of size 1, where every helper is a no-op, so the trainer has
one code path. Backend: gloo on CPU, nccl on CUDA (PyTorch's own engine, nothing home-made).
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and "RANK" in os.environ


_launcher_pid: int | None = None


class LauncherGone(RuntimeError):
    """torchrun's agent died (e.g. ``kill -9``); its workers stop instead of running on alone."""


def check_launcher(ctx: "DistContext") -> None:
    """Stop a worker whose torchrun agent is gone.

    torchrun starts each worker in a session of its own, so killing the agent leaves the
    workers training (and writing checkpoints) as orphans; a ``--resume`` started then would
    be a second writer on the same run folder. Called every step: one getppid() call.
    """
    if ctx.enabled and _launcher_pid is not None and os.getppid() != _launcher_pid:
        raise LauncherGone(f"rank {ctx.rank}: the torchrun launcher (pid {_launcher_pid}) is gone; "
                           "this worker stops. Resume with --resume (the last checkpoint is intact)")


def init_from_env(device: torch.device) -> tuple[DistContext, torch.device]:
    """Join the process group torchrun describes; on CUDA each rank takes its local GPU."""
    global _launcher_pid
    if not launched_by_torchrun():
        return DistContext(), device
    _launcher_pid = os.getppid()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return DistContext(dist.get_rank(), dist.get_world_size(), local_rank), device


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(values: list[float], ctx: DistContext, device: torch.device) -> list[float]:
    """Sum a few scalars over ranks (float64 so counts stay exact)."""
    if not ctx.enabled:
        return list(values)
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return tensor.tolist()


def all_reduce_mean_(tensors: list[torch.Tensor], ctx: DistContext) -> None:
    """Average tensors over ranks in place (RigL's dense gradient on sharded batches)."""
    if not ctx.enabled:
        return
    for tensor in tensors:
        dist.all_reduce(tensor)
        tensor.div_(ctx.world_size)


def all_gather_rows(tensor: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """Concatenate each rank's 1-D tensor in rank order; lengths may differ between ranks."""
    if not ctx.enabled:
        return tensor
    length = torch.tensor([tensor.numel()], device=tensor.device)
    lengths = [torch.zeros_like(length) for _ in range(ctx.world_size)]
    dist.all_gather(lengths, length)
    longest = int(max(n.item() for n in lengths))
    padded = torch.zeros(longest, dtype=tensor.dtype, device=tensor.device)
    padded[: tensor.numel()] = tensor
    gathered = [torch.zeros_like(padded) for _ in range(ctx.world_size)]
    dist.all_gather(gathered, padded)
    return torch.cat([g[: int(n.item())] for g, n in zip(gathered, lengths)])


def gather_strings(value: str, ctx: DistContext) -> list[str]:
    if not ctx.enabled:
        return [value]
    out: list[str | None] = [None] * ctx.world_size
    dist.all_gather_object(out, value)
    return [str(v) for v in out]


def barrier(ctx: DistContext) -> None:
    if ctx.enabled:
        dist.barrier()


def state_hash(tensors: list[torch.Tensor]) -> str:
    """Short digest of tensors' bytes: ranks compare masks and sieve state with it."""
    digest = hashlib.sha256()
    for tensor in tensors:
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]
