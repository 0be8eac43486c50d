"""Data-parallel training with PyTorch's own engine (``torchrun`` + DistributedDataParallel).

One process per device. ``torchrun`` sets ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK``;
:func:`setup` reads them, joins the process group (NCCL on GPUs, gloo on CPUs) and picks the
device. Without those variables everything here is a no-op and training is single-process.

Design, so that N ranks with batch B train exactly like one process with batch N·B:

* Each step's random numbers are drawn for the *global* batch and each rank keeps its slice, so a
  rank's images and masks are the rows ``rank·B … (rank+1)·B`` of the global batch a single process
  would see: crop boxes and flips from a generator seeded by (seed, epoch, step)
  (:func:`clmae.data.loader.augmentation_seed`), random masks from the trainer's generator, the same on
  every rank (same seed, same draws). The epoch order is one permutation from ``seed + epoch``;
  global step ``s`` covers ``order[s·N·B : (s+1)·N·B]`` and each rank takes its block.
* The MAE is wrapped in DDP; the MAE step runs through the wrapped MAE. A masking strategy's
  trainable parameters (CL-MAE's masking module, HPM's loss predictor) are not wrapped: their
  gradients are averaged over the ranks by :func:`average_gradients` once per accumulation window,
  which is what DDP would do. CL-MAE's masking step runs the *unwrapped* MAE (``forward_soft``)
  with ``backward(inputs=masker parameters)``, so the MAE's DDP hooks never fire there and neither
  ``find_unused_parameters`` nor toggling ``requires_grad`` is needed.
* Decisions that change control flow (skip a non-finite step, stop on a signal, end an epoch
  early) are agreed by all ranks, so no rank ever waits alone in a collective.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from .errors import ConfigError
from .runtime import resolve_device

T = TypeVar("T")


@dataclass
class DistContext:
    """Where this process stands in the job. ``world_size == 1`` means no process group."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    backend: str | None = None
    owns_group: bool = False  # we created the process group, so we destroy it

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def rows(self, local_batch: int) -> slice:
        """This rank's rows of a global batch of ``world_size · local_batch``."""
        return slice(self.rank * local_batch, (self.rank + 1) * local_batch)


SINGLE = DistContext()


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"environment variable {name}={value!r} is not an integer; launch with torchrun") from None


def launched_world() -> tuple[int, int, int]:
    """``(rank, world_size, local_rank)`` from the launcher's environment (torchrun, SLURM via torchrun)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), _env_int("LOCAL_RANK", dist.get_rank())
    return _env_int("RANK", 0), _env_int("WORLD_SIZE", 1), _env_int("LOCAL_RANK", 0)


def setup(device_option: str) -> DistContext | None:
    """Join the process group when launched by torchrun; ``None`` for a single-process run."""
    rank, world, local = launched_world()
    if world <= 1:
        return None
    if not dist.is_available():
        raise ConfigError("WORLD_SIZE > 1 but this PyTorch build has no torch.distributed")
    device = resolve_device(device_option, local)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    owns = False
    if not dist.is_initialized():
        missing = [v for v in ("MASTER_ADDR", "MASTER_PORT") if not os.environ.get(v)]
        if missing:
            raise ConfigError(f"WORLD_SIZE={world} but {', '.join(missing)} not set; launch with "
                              "`torchrun --nproc-per-node N -m clmae pretrain ...`")
        backend = "nccl" if device.type == "cuda" else "gloo"
        kwargs = {"device_id": device} if device.type == "cuda" else {}
        dist.init_process_group(backend, rank=rank, world_size=world, **kwargs)
        owns = True
    backend = dist.get_backend()
    if device.type == "cpu" and backend != "gloo":
        raise ConfigError(f"the process group uses {backend}, which cannot run on CPU tensors; use --device cuda")
    return DistContext(rank, world, local, device, backend, owns)


def teardown(ctx: DistContext) -> None:
    if ctx.enabled and ctx.owns_group and dist.is_initialized():
        dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------
# Small collectives (all no-ops for a single process)


def barrier(ctx: DistContext) -> None:
    if ctx.enabled:
        dist.barrier()


def all_true(flag: bool, ctx: DistContext) -> bool:
    """True only if ``flag`` holds on every rank (used for skip / continue decisions)."""
    if not ctx.enabled:
        return bool(flag)
    t = torch.tensor([1.0 if flag else 0.0], device=ctx.device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item() > 0.5)


def any_true(flag: bool, ctx: DistContext) -> bool:
    return not all_true(not flag, ctx)


def all_reduce_min(flag: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """A device bool true only where it is true on every rank, without a host read (one small all-reduce)."""
    if not ctx.enabled:
        return flag
    t = flag.reshape(1).to(torch.float32)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return (t > 0.5).reshape(flag.shape)


def mean_metrics(values: dict[str, float], ctx: DistContext) -> dict[str, float]:
    """Average each metric over the ranks that have it (the logged losses of all ranks)."""
    if not ctx.enabled:
        return dict(values)
    gathered: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(gathered, dict(values))
    out: dict[str, float] = {}
    for key in sorted({k for d in gathered for k in d}):
        vals = [float(d[key]) for d in gathered if key in d]
        out[key] = sum(vals) / len(vals)
    return out


def gather_objects(obj: T, ctx: DistContext) -> list[T]:
    if not ctx.enabled:
        return [obj]
    gathered: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(gathered, obj)
    return gathered


def broadcast_object(obj: T, ctx: DistContext) -> T:
    """Rank 0's value of ``obj`` on every rank (e.g. a time-stamped output folder)."""
    if not ctx.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def on_main(fn: Callable[[], T], ctx: DistContext) -> T:
    """Run ``fn`` on rank 0 only; its result or its user error reaches every rank.

    For file-system work (create the run folder, refuse to overwrite a run) that must happen
    once, while a refusal must stop all ranks, not leave the others waiting.
    """
    if not ctx.enabled:
        return fn()
    result, error = None, None
    if ctx.is_main:
        try:
            result = fn()
        except Exception as exc:  # noqa: BLE001 — every rank must learn that rank 0 failed
            error = exc
    result, error = broadcast_object((result, error), ctx)
    if error is not None:
        raise error
    return result


# ---------------------------------------------------------------------------------------------
# Models


def wrap(module: torch.nn.Module, ctx: DistContext) -> torch.nn.Module:
    """DDP-wrap ``module`` (unchanged for one process). Buffers are fixed, so none are synced at each forward.

    torch 2.14 renames ``broadcast_buffers`` to ``forward_sync_buffers`` (the old name warns); the new one still
    syncs buffers once at construction, which changes nothing here: every rank builds the same fixed buffers.
    """
    if not ctx.enabled:
        return module
    import inspect

    from torch.nn.parallel import DistributedDataParallel as DDP

    device_ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    renamed = "forward_sync_buffers" in inspect.signature(DDP.__init__).parameters
    no_sync = {"forward_sync_buffers" if renamed else "broadcast_buffers": False}
    return DDP(module, device_ids=device_ids, **no_sync)


def average_over_ranks(value: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """The mean of ``value`` over all ranks (``value`` itself for one process)."""
    if not ctx.enabled:
        return value
    total = value.detach().clone()
    dist.all_reduce(total)
    return total / ctx.world_size


def average_gradients(params: list[torch.nn.Parameter], ctx: DistContext) -> None:
    """Replace each parameter's gradient by its mean over the ranks, as DDP does (one all-reduce).

    For modules that are not DDP-wrapped (a masking strategy's parameters): called once per
    accumulation window, before the optimiser step. A missing gradient counts as zero.
    """
    if not ctx.enabled or not params:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= ctx.world_size
    offset = 0
    for p in params:
        n = p.numel()
        p.grad = flat[offset:offset + n].view_as(p).clone()
        offset += n


def no_sync(module: torch.nn.Module, skip_sync: bool):
    """DDP's ``no_sync`` during gradient accumulation (a plain context otherwise)."""
    if skip_sync and hasattr(module, "no_sync"):
        return module.no_sync()
    return contextlib.nullcontext()


# ---------------------------------------------------------------------------------------------
# Losses


def split_mean(fn: Callable[..., dict[str, torch.Tensor]], groups: int,
               *tensors: torch.Tensor) -> dict[str, torch.Tensor]:
    """``fn`` on ``groups`` equal row blocks of ``tensors``, averaged: per-device loss semantics in one process.

    DDP averages the ranks' gradients, i.e. it optimises the mean of the per-rank losses; a single
    process that wants the same objective (e.g. to reproduce an N-GPU run) evaluates the loss this way.
    """
    if groups == 1:
        return fn(*tensors)
    n = tensors[0].shape[0]
    if n % groups:
        raise ConfigError(f"cannot split a batch of {n} into {groups} equal loss groups")
    chunks = [t.chunk(groups) for t in tensors]
    parts = [fn(*(c[i] for c in chunks)) for i in range(groups)]
    return {k: sum(p[k] for p in parts) / groups for k in parts[0]}
