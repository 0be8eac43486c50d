"""Where and how tensors run: the device rule, the precision rule, module-state context managers, FLOP counting.

Every part of clmae (training, evaluation, pictures, DDP ranks) picks its device and its mixed
precision here, so one rule holds everywhere. ``--precision auto`` (:func:`resolve_precision`)
trains in bf16 autocast on CUDA GPUs that have bf16 (compute capability 8 and newer), in fp16
autocast with loss scaling on older ones, and in fp32 on the CPU and MPS; ``bf16`` and ``fp16`` may
be asked for on the CPU too (slow, but the same dtype paths as on a GPU, so tests can run them).
Evaluation and pictures without a run's precision use :func:`autocast`'s default: bf16 where the
GPU has it, fp32 elsewhere (never fp16: fine-tuning has no loss scaler).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

from .errors import ConfigError
from .options import DEVICE_CHOICES, PRECISIONS, one_of


def resolve_device(name: str, local_rank: int | None = None) -> torch.device:
    """The device for ``--device NAME``; ``auto`` prefers CUDA, then MPS, then the CPU.

    ``local_rank`` (a process of a torchrun job) maps ``auto``/``cuda`` to ``cuda:LOCAL_RANK``;
    such a job runs on CUDA or on the CPU only.
    """
    if local_rank is not None:
        return _rank_device(name, local_rank)
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"--device: unknown device {name!r}; use {DEVICE_CHOICES}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device: CUDA was requested but no CUDA GPU is available; use --device cpu")
    return device


def _rank_device(option: str, local_rank: int) -> torch.device:
    if option in ("auto", "cuda"):
        if torch.cuda.is_available():
            if local_rank >= torch.cuda.device_count():
                raise ConfigError(f"LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} GPU(s) visible; "
                                  "use --nproc-per-node <= the number of GPUs")
            return torch.device("cuda", local_rank)
        if option == "cuda":
            raise ConfigError("--device: CUDA was requested but no CUDA GPU is available; use --device cpu")
        return torch.device("cpu")
    if option == "cpu":
        return torch.device("cpu")
    raise ConfigError(f"--device {option!r} cannot be used with several processes; use --device cuda (each rank takes "
                      "cuda:LOCAL_RANK; choose GPUs with CUDA_VISIBLE_DEVICES) or --device cpu")


DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}  # what autocast computes in


def cuda_has_bf16(device: torch.device) -> bool:
    """Whether the GPU computes bf16 natively (compute capability >= 8: A100, H100, RTX 30xx and newer)."""
    return torch.cuda.get_device_capability(device)[0] >= 8


def resolve_precision(option: str, device: torch.device) -> str:
    """The precision a run trains in for ``--precision OPTION`` on ``device``: ``fp32``, ``bf16`` or ``fp16``.

    ``auto``: bf16 on CUDA with native bf16, fp16 (with loss scaling) on older CUDA GPUs, fp32 on the
    CPU and MPS. An explicit choice is kept; fp16 on a device whose torch build cannot autocast to it
    or scale losses there is one clear error.
    """
    if option not in PRECISIONS:
        raise ConfigError(f"--precision: got {option!r}, expected {one_of(PRECISIONS)}")
    if option == "auto":
        if device.type == "cuda":
            return "bf16" if cuda_has_bf16(device) else "fp16"
        return "fp32"
    if option == "fp16" and device.type != "cuda" and not _fp16_works(device.type):
        raise ConfigError(f"--precision fp16: this PyTorch ({torch.__version__}) cannot train in fp16 on "
                          f"{device.type} (autocast to float16 or torch.amp.GradScaler({device.type!r}) is missing); "
                          "use --precision bf16 or fp32")
    return option


def _fp16_works(device_type: str) -> bool:
    """Whether fp16 autocast and a GradScaler run on ``device_type`` with this torch (tried on a tiny op)."""
    try:
        with torch.autocast(device_type, dtype=torch.float16):
            y = torch.nn.functional.linear(torch.ones(2, 2, device=device_type), torch.ones(2, 2, device=device_type))
        torch.amp.GradScaler(device_type)
        return y.dtype == torch.float16
    except (RuntimeError, AttributeError, TypeError, ValueError):
        return False


def default_precision(device: torch.device) -> str:
    """What code without a run's precision computes in (evaluation, pictures): bf16 on GPUs that have it,
    else fp32. Never fp16: that needs loss scaling to train (fine-tuning has none)."""
    return "bf16" if device.type == "cuda" and cuda_has_bf16(device) else "fp32"


def autocast(device: torch.device, precision: str | None = None) -> contextlib.AbstractContextManager:
    """The autocast context for ``precision`` (``fp32``/``bf16``/``fp16``) on ``device``; ``None``: the
    device's default (:func:`default_precision`). fp32 is no autocast at all."""
    dtype = DTYPES[precision or default_precision(device)]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def grad_scaler(device: torch.device, precision: str) -> torch.amp.GradScaler | None:
    """A loss scaler for fp16 (its gradients underflow without one); None for fp32 and bf16."""
    return torch.amp.GradScaler(device.type) if precision == "fp16" else None


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor (random draws, indices) on ``device`` without making the host wait for the GPU.

    A copy from ordinary (pageable) memory synchronises the CUDA stream; from pinned memory it is
    queued like a kernel. On other devices this is ``tensor.to(device)``.
    """
    if device.type == "cuda" and tensor.device.type == "cpu":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


@contextlib.contextmanager
def frozen(module: torch.nn.Module) -> Iterator[None]:
    """``requires_grad=False`` on the module's parameters for the forward inside (restored after).

    With ``backward(inputs=...)`` alone autograd computes no weight gradient for the MAE, but the
    forward still saves every linear layer's input for one; frozen, it does not (~18% less peak
    memory in the masking step of vit_tiny at batch 128). The graph keeps no edge to these
    parameters, so restoring ``requires_grad`` before ``backward`` is safe.
    """
    params = [p for p in module.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


@contextlib.contextmanager
def eval_mode(*modules: torch.nn.Module | None) -> Iterator[None]:
    """Put modules in eval mode and give each its own mode back afterwards."""
    present = [m for m in modules if m is not None]
    modes = [m.training for m in present]
    try:
        for m in present:
            m.eval()
        yield
    finally:
        for m, mode in zip(present, modes):
            m.train(mode)


def usable_cores() -> int:
    """The CPU cores this process may run on (its affinity: what SLURM or taskset granted), else all of them."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def training_threads(requested: int | None, device: torch.device, local_ranks: int = 1) -> int | None:
    """The CPU threads a training process computes with (``--threads``); None: leave torch's setting (GPU runs).

    ``requested`` wins. Otherwise, on the CPU: torch's own count (one per core, or ``OMP_NUM_THREADS``), lowered to
    the cores the machine's other processes leave free (cores less the 1-minute load average, rounded), shared by
    the ``local_ranks`` training processes on this machine; at least 1. On a busy 2-core machine the default CL-MAE
    run on digits trained at 34 img/s with 2 threads and at 279 with 1 (an oversubscribed core stalls every
    thread of a parallel matmul), while on a quiet one the second thread adds about half (``make run``'s rate).
    """
    if device.type != "cpu":
        return requested
    if requested is not None:
        return requested
    try:
        busy = os.getloadavg()[0]
    except (OSError, AttributeError):  # no load average (Windows): assume the cores are free
        busy = 0.0
    free = max(1, int(usable_cores() - busy + 0.5))
    return max(1, min(torch.get_num_threads(), free // max(1, local_ranks)))


@contextlib.contextmanager
def few_threads(device: torch.device) -> Iterator[None]:
    """One CPU thread for tiny matrix work (probe heads): with more, thread hand-off costs more than the
    work (10x slower on a busy machine). No effect on other devices."""
    if device.type != "cpu":
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# ---------------------------------------------------------------------------------------------
# Counting training FLOPs: FlopCounterMode plus the CPU flash-attention kernels it does not know.
# Equal-compute comparisons (the CIFAR-10 study, benchmarks/throughput.py) need the FLOPs of a real
# training iteration; on CPU, scaled-dot-product attention runs a kernel FlopCounterMode would count
# as zero, so its forward and backward get the standard SDPA formulas.
def _cpu_flash_flops(query, key, value, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query, key, value)


def _cpu_flash_backward_flops(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
    return sdpa_backward_flop_count(grad_out, query, key, value)


def flop_counter() -> FlopCounterMode:
    """A silent ``FlopCounterMode`` that also counts CPU flash attention (use as a context manager)."""
    mapping = {}
    aten = torch.ops.aten
    if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu"):
        mapping[aten._scaled_dot_product_flash_attention_for_cpu] = _cpu_flash_flops
        mapping[aten._scaled_dot_product_flash_attention_for_cpu_backward] = _cpu_flash_backward_flops
    return FlopCounterMode(display=False, custom_mapping=mapping)
