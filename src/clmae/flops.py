"""Counting training FLOPs: ``FlopCounterMode`` plus the CPU flash-attention kernels it does not know.

Equal-compute comparisons (the CIFAR-10 study, ``benchmarks/throughput.py``) need the FLOPs of a
real training iteration; on CPU, PyTorch's scaled-dot-product attention runs a kernel that
``FlopCounterMode`` would count as zero, so its forward and backward get the standard SDPA formulas.
"""

from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count


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
