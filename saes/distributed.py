"""The distributed wrapper around the SAE step, for runs launched with ``torchrun --standalone``.

Two modes:
- ``ddp``: every rank holds every SAE and a different slice of each global batch. Each rank
  normalises its FVU and AuxK by the variance of the *global* batch (:func:`total_variance_over_ranks`),
  so the global loss is the sum of the rank losses and gradients are summed (all-reduce): per-token
  TopK then matches one process up to float reduction order. BatchTopK keeps the top ``k * B``
  of the global batch: the cut is found over ranks (:func:`kth_largest_over_ranks`) and the
  smallest kept activation is the minimum over ranks, so its running threshold and selection
  match one process too. The explicit step state is synced: a latent counts as fired if it fired
  on any rank.
- ``shard``: the SAEs are dealt out to ranks; every rank reads the same batches and trains its own
  share, nothing is reduced. Rank 0 gathers metrics and writes the shared files.
CPU runs use the gloo backend, CUDA runs NCCL (one device per local rank).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from jaxtyping import Float
from torch import Tensor

from interp.errors import UserError

__all__ = [
    "DistContext", "setup", "all_reduce_grads", "total_variance_over_ranks", "kth_largest_over_ranks", "min_over_ranks",
    "sync_step_state", "mean_over_ranks", "sum_over_ranks", "gather_objects", "all_gather_objects", "any_over_ranks",
    "errors_together", "device_for",
]


@dataclass
class DistContext:
    """Where this process sits in the run."""

    mode: str
    """'none', 'ddp' or 'shard'."""
    rank: int
    """Rank of this process (0 when not distributed)."""
    world: int
    """Number of processes."""
    device: torch.device
    """Device this rank trains on."""
    owns_group: bool = False
    """Whether :func:`setup` created the process group (and :meth:`close` should destroy it)."""
    host_group: Any = None
    """A gloo group for host-side collectives (flags, objects) when the default group is NCCL; None: the default group."""

    @property
    def is_main(self) -> bool:
        """Whether this rank writes the shared files (metrics, checkpoint manifest, ddp SAEs)."""
        return self.rank == 0

    @property
    def active(self) -> bool:
        """Whether collectives are needed (more than one process)."""
        return self.world > 1

    def barrier(self) -> None:
        """Wait for every rank (no-op in one process)."""
        if self.active:
            dist.barrier()

    def close(self) -> None:
        """Tear down the process group if this module created it (else only the host group it added)."""
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()
        elif self.host_group is not None and dist.is_initialized():
            dist.destroy_process_group(self.host_group)


def _pick_device(device: str | None, local_rank: int, world: int = 1) -> torch.device:
    """The device this rank trains on: the requested one, else CUDA when available, else the CPU.

    Under torchrun (``world > 1``) each rank takes the GPU of its ``LOCAL_RANK``: ``--device cuda``
    (or no device) means that GPU; a pinned ``cuda:N`` (which would put every rank on one GPU) and
    more ranks on a node than it has GPUs are one-line errors.
    """
    from interp.models import resolve_device  # lazily: interp.models imports TransformerLens

    dev = resolve_device(device)
    if dev.type != "cuda" or (world == 1 and dev.index is not None):
        return dev
    if world > 1 and dev.index is not None:
        raise UserError(f"--device {device} would put all {world} ranks on one GPU; pass --device cuda and each rank takes the GPU of its LOCAL_RANK")
    count = torch.cuda.device_count()
    if count == 1 and os.environ.get("CUDA_VISIBLE_DEVICES"):  # the launcher gave this process one GPU of its own (e.g. SLURM)
        return torch.device("cuda", 0)
    if local_rank >= count:
        raise UserError(f"local rank {local_rank} has no GPU of its own: this node has {count}; launch at most {count} processes per node "
                        f"(--nproc_per_node {count}) or pass --device cpu")
    return torch.device("cuda", local_rank)


def device_for(mode: str, device: str | None = None) -> torch.device:
    """The device :func:`setup` gives this process for ``mode`` (under torchrun: its ``LOCAL_RANK``'s GPU),
    for what must be placed before the run starts, such as a model harvested on the fly.

    ``--dist none`` in one of several torchrun processes is refused: N copies would train into one output.
    """
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if mode == "none":
        if world > 1:
            raise UserError(f"this process is one of {world} torchrun ranks, but --dist none would train {world} copies into the same "
                            "--out; pass --dist ddp or --dist shard, or run without torchrun")
        return _pick_device(device, 0)
    return _pick_device(device, int(os.environ.get("LOCAL_RANK", os.environ.get("RANK", "0"))), world)


def setup(mode: str, device: str | None = None) -> DistContext:
    """Join the torchrun process group for ``mode`` (or stay single-process for 'none')."""
    dev = device_for(mode, device)
    if mode == "none":
        return DistContext("none", 0, 1, dev)
    if "WORLD_SIZE" not in os.environ or "RANK" not in os.environ:
        raise UserError(f"--dist {mode} needs a torchrun launch, e.g. torchrun --standalone --nproc_per_node 2 -m experiments.cli train-sae ...")
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    owns = world > 1 and not dist.is_initialized()
    if owns:
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
    host_group = None
    if world > 1 and dist.get_backend() != "gloo":  # collectively, on every rank
        host_group = dist.new_group(backend="gloo")
    return DistContext(mode, rank, world, dev, owns, host_group)


def all_reduce_grads(params: list[torch.nn.Parameter], world: int) -> None:
    """Sum gradients over ranks in one flat all-reduce (each rank's loss is already divided by the global variance)."""
    grads = [p.grad for p in params if p.grad is not None]
    if world == 1 or not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()


def total_variance_over_ranks(xs: list[Float[Tensor, "S B d"]], world: int) -> list[Float[Tensor, "S"]]:
    """``sum_b ||x_b - mean x||^2`` per member over the global batch that each rank's ``x`` is a slice of.

    One all-reduce of ``sum_b x_b``, ``sum_b ||x_b||^2`` and the row count, in float64, then
    ``sum_b ||x_b - mean x||^2 = sum_b ||x_b||^2 - ||sum_b x_b||^2 / N`` (float64 keeps the
    cancellation harmless for inputs scaled to ``E||x||^2 = d_in``). Returned in each ``x``'s dtype.
    """
    stats = []
    for x in xs:
        x64 = x.double()
        stats += [x64.sum(1).reshape(-1), x64.pow(2).sum((1, 2)), torch.tensor([x.shape[1]], dtype=torch.float64, device=x.device)]
    flat = torch.cat(stats)
    if world > 1:
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    out, offset = [], 0
    for x in xs:
        S, _, d = x.shape
        sum_x = flat[offset:offset + S * d].view(S, d)
        sum_sq = flat[offset + S * d:offset + S * d + S]
        rows = flat[offset + S * d + S]
        out.append((sum_sq - sum_x.pow(2).sum(-1) / rows).to(x.dtype))
        offset += S * d + S + 1
    return out


def kth_largest_over_ranks(values: Float[Tensor, "S L"], kth: int, world: int) -> Float[Tensor, "S"]:
    """Per member, the ``kth`` largest of all ranks' ``values`` together (BatchTopK's cut over the global batch).

    The global top ``kth`` holds at most ``min(kth, L)`` entries of any one rank, so each rank sends
    only its own top ``min(kth, L)``: the ``kth`` largest of their union is the global one. Every
    rank holds the same ``L``; ``kth <= world * L``.
    """
    local = values.contiguous() if kth >= values.shape[1] else values.topk(kth, dim=1, sorted=False).values.contiguous()
    if world > 1:
        parts = [torch.empty_like(local) for _ in range(world)]
        dist.all_gather(parts, local)
        local = torch.cat(parts, dim=1)
    return local.kthvalue(local.shape[1] - kth + 1, dim=1).values


def min_over_ranks(values: Tensor, world: int) -> Tensor:
    """Elementwise minimum of a tensor over ranks."""
    if world == 1:
        return values
    out = values.clone()
    dist.all_reduce(out, op=dist.ReduceOp.MIN)
    return out


def sync_step_state(old: Any, new: Any, local_rows: int, world: int) -> Any:
    """Make the step state identical on all ranks, as if one process had seen the whole global batch.

    A latent that fired on any rank restarts its count at 0; one that fired nowhere has seen
    ``world * local_rows`` more tokens since it last fired. The BatchTopK threshold needs nothing:
    every rank computed it from the global batch's smallest kept activation.
    """
    if world == 1:
        return new
    fired = (new.tokens_since_fired == 0).to(torch.int32)
    dist.all_reduce(fired, op=dist.ReduceOp.MAX)
    new.tokens_since_fired = torch.where(fired.bool(), torch.zeros_like(old.tokens_since_fired),
                                         old.tokens_since_fired + world * local_rows)
    return new


def sum_over_ranks(values: Tensor, world: int) -> Tensor:
    """Sum of a tensor over ranks (for logged metrics that add up over slices of a batch, like FVU)."""
    if world == 1:
        return values
    out = values.detach().clone().float()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out


def mean_over_ranks(values: Tensor, world: int) -> Tensor:
    """Mean of a tensor over ranks (for logged metrics such as L0)."""
    return values if world == 1 else sum_over_ranks(values, world) / world


def any_over_ranks(flag: bool, ctx: DistContext) -> bool:
    """Whether ``flag`` is true on any rank: a host-side collective (no device sync), so every rank can raise the same error."""
    if not ctx.active:
        return flag
    out = torch.tensor([int(flag)], dtype=torch.int32)
    dist.all_reduce(out, op=dist.ReduceOp.MAX, group=ctx.host_group)
    return bool(out[0])


def all_gather_objects(obj: Any, ctx: DistContext) -> list[Any]:
    """Every rank's ``obj`` on every rank, in rank order."""
    if not ctx.active:
        return [obj]
    out = [None] * ctx.world
    dist.all_gather_object(out, obj, group=ctx.host_group)
    return out


@contextmanager
def errors_together(ctx: DistContext) -> Iterator[None]:
    """Run a block on every rank; a UserError raised on any rank is raised on every rank (the lowest
    rank's message), so no rank goes on to wait in a collective for one that stopped."""
    error = None
    try:
        yield
    except UserError as err:
        if not ctx.active:
            raise
        error = err
    if ctx.active:
        first = next((m for m in all_gather_objects(None if error is None else str(error), ctx) if m is not None), None)
        if first is not None:
            raise UserError(first) from error


def gather_objects(obj: Any, ctx: DistContext) -> list[Any]:
    """Every rank's ``obj`` on rank 0 (others get an empty list)."""
    if not ctx.active:
        return [obj]
    out = [None] * ctx.world if ctx.is_main else None
    dist.gather_object(obj, out, dst=0, group=ctx.host_group)
    return out if ctx.is_main else []
