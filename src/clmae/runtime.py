"""Where and how tensors run: the device rule, the autocast rule, module-state context managers, FLOP counting.

Every part of clmae (training, evaluation, pictures, DDP ranks) picks its device and its mixed
precision here, so one rule holds everywhere: CUDA computes in bf16 autocast, every other device
in fp32.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

from .errors import ConfigError
from .options import DEVICE_CHOICES


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


def autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA (no loss scaling needed), plain fp32 elsewhere."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


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
