"""Where the time of one CL-MAE iteration goes: a torch.profiler trace split by phase and by kind of op.

The trainer is built and driven as in ``benchmarks/throughput.py`` (so the real ``train_step``
runs). For the profile only, the parts of an iteration are labelled with
``torch.profiler.record_function`` by wrapping them on the instance: masker scoring, MAE
forward, backward passes, optimiser steps, the masking-module step and its masker / soft
forwards. Every aten op is then attributed (by its self time) to the innermost label around it
and to a category (matmul, attention, norm, activation, copies, optimiser math, other).

    python benchmarks/profile_iteration.py --model vit_tiny_patch4_32 --batch-size 128 --threads 1
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections import defaultdict
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile, record_function

from clmae.maskers import METHODS

sys.path.insert(0, str(Path(__file__).resolve().parent))
from throughput import Runner, build_trainer, sync

CATEGORIES: list[tuple[str, tuple[str, ...]]] = [
    ("matmul", ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::matmul", "aten::linear",
                "aten::mkldnn_convolution", "aten::convolution_backward", "aten::_convolution")),
    ("attention", ("aten::_scaled_dot_product", "aten::_flash_attention", "aten::_efficient_attention")),
    ("layernorm", ("aten::native_layer_norm", "aten::layer_norm")),
    ("gelu", ("aten::gelu",)),
    ("copy/cat/scatter", ("aten::copy_", "aten::cat", "aten::clone", "aten::contiguous", "aten::scatter",
                          "aten::gather", "aten::index", "aten::fill_", "aten::zero_", "aten::_to_copy",
                          "aten::expand", "aten::index_select", "aten::grid_sampler")),
    ("optimizer math", ("aten::_foreach", "aten::_fused_adam", "aten::lerp", "aten::addcmul", "aten::addcdiv",
                        "aten::sqrt", "aten::linalg_vector_norm")),
    ("masking/losses", ("aten::topk", "aten::sort", "aten::cdist", "aten::_cdist", "aten::sigmoid", "aten::exp",
                        "aten::log", "aten::triu_indices")),
]


def category(name: str) -> str:
    for cat, prefixes in CATEGORIES:
        if name.startswith(prefixes):
            return cat
    return "other element-wise"


class Labeller:
    """Wraps callables so that each call runs inside a named record_function range."""

    def __init__(self) -> None:
        self.in_masking_step = False

    def wrap(self, obj: Any, attr: str, name: str, phase_aware: bool = True) -> None:
        fn: Callable = getattr(obj, attr)

        def labelled(*a, **kw):
            prefix = ("masking_step/" if self.in_masking_step else "mae_step/") if phase_aware else ""
            with record_function(prefix + name):
                return fn(*a, **kw)

        setattr(obj, attr, labelled)

    def wrap_masking_step(self, trainer) -> None:
        fn = trainer.strategy_step

        def labelled(*a, **kw):
            self.in_masking_step = True
            try:
                with record_function("masking_step"):
                    return fn(*a, **kw)
            finally:
                self.in_masking_step = False

        trainer.strategy_step = labelled

    @contextmanager
    def backward_labels(self):
        """Label every ``Tensor.backward`` during the profile (it calls ``torch.autograd.backward``)."""
        original = torch.autograd.backward

        def labelled(*a, **kw):
            with record_function(("masking_step/" if self.in_masking_step else "mae_step/") + "backward"):
                return original(*a, **kw)

        torch.autograd.backward = labelled
        try:
            yield
        finally:
            torch.autograd.backward = original


def attribute(prof) -> tuple[dict[str, float], dict[str, dict[str, float]], float]:
    """Self CPU time per label and per (label, category), in ms; plus the iteration's wall time."""
    events = prof.events()
    labels = [e for e in events if e.name in LABELS]
    ops = [e for e in events if e.name.startswith("aten::")]
    per_label: dict[str, float] = defaultdict(float)
    per_cat: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    for op in ops:
        start = op.time_range.start
        inside = [lab for lab in labels if lab.time_range.start <= start < lab.time_range.end]
        if not inside:
            continue
        innermost = max(inside, key=lambda lab: lab.time_range.start)
        name = innermost.name if innermost.name not in ("iteration", "masking_step") else innermost.name + "/other"
        if name == "iteration/other":
            name = "mae_step/other"
        ms = op.self_cpu_time_total / 1000.0
        per_label[name] += ms
        per_cat[name][category(op.name)] += ms
    total = sum(e.cpu_time_total for e in labels if e.name == "iteration") / 1000.0
    return per_label, per_cat, total


LABELS = {"iteration", "data", "masking_step"} | {
    f"{phase}/{part}" for phase in ("mae_step", "masking_step")
    for part in ("masker_scores", "forward", "backward", "optimizer", "masker_forward", "soft_forward")
}
ORDER = ["data", "mae_step/masker_scores", "mae_step/forward", "mae_step/backward", "mae_step/optimizer",
         "mae_step/other", "masking_step/masker_forward", "masking_step/soft_forward", "masking_step/backward",
         "masking_step/optimizer", "masking_step/other"]
CAT_NAMES = [c for c, _ in CATEGORIES] + ["other element-wise"]


def markdown(per_label, per_cat, total_ms: float, title: str) -> str:
    ops_total = sum(per_label.values())
    head = "| phase | ms | % | " + " | ".join(CAT_NAMES) + " |"
    rule = "|" + "---|" * (3 + len(CAT_NAMES))
    lines = [f"**{title}** — iteration wall time {total_ms:.0f} ms in the profiler; op self time {ops_total:.0f} ms",
             "", head, rule]
    for name in ORDER + sorted(set(per_label) - set(ORDER)):
        if name not in per_label:
            continue
        ms = per_label[name]
        cats = " | ".join(f"{per_cat[name].get(c, 0.0):.0f}" for c in CAT_NAMES)
        lines.append(f"| {name} | {ms:.0f} | {100 * ms / ops_total:.1f} | {cats} |")
    sums = {c: sum(per_cat[n].get(c, 0.0) for n in per_cat) for c in CAT_NAMES}
    lines.append("| **total** | {:.0f} | 100 | {} |".format(
        ops_total, " | ".join(f"{v:.0f} ({100 * v / ops_total:.0f}%)" for v in sums.values())))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="vit_tiny_patch4_32")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--device", default="cpu")
    p.add_argument("--method", default="clmae", choices=list(METHODS))
    p.add_argument("--masker-every", type=int, default=1)
    p.add_argument("--masker-batch-fraction", type=float, default=1.0)
    p.add_argument("--data", default="synthetic")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--compile", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--top", type=int, default=15, help="rows of the per-op table")
    p.add_argument("--trace", default=None, help="also write a Chrome trace (JSON) here")
    p.add_argument("--output", default=None, help="write the markdown summary here as well")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory(prefix="clmae-prof-") as tmp:
        trainer = build_trainer(args.method, args, Path(tmp))
        runner = Runner(trainer)  # its timers stay; they only add synchronisation on CUDA
        runner.iterate(args.warmup)
        imgs = next(runner.batches)

        lab = Labeller()
        if not trainer.masker.uniform:
            lab.wrap(trainer.masker, "keep_indices", "masker_scores")
        if trainer.masker.has_own_step:
            lab.wrap(trainer.masker, "forward", "masker_forward")
            lab.wrap(trainer.masker, "soft_forward", "soft_forward")
            lab.wrap(trainer.opt_masker, "step", "optimizer")
            lab.wrap_masking_step(trainer)
        lab.wrap(trainer, "mae_forward", "forward")
        lab.wrap(trainer.opt_mae, "step", "optimizer")
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if trainer.device.type == "cuda" else [])
        with lab.backward_labels(), profile(activities=activities) as prof:
            with record_function("data"):
                imgs = next(runner.batches)
                sync(trainer.device)
            with record_function("iteration"):
                trainer.train_step([imgs], trainer.lr)
                sync(trainer.device)
        trainer.position.iteration += 1

    per_label, per_cat, total = attribute(prof)
    title = (f"{args.method} {args.model} batch {args.batch_size}, {torch.get_num_threads()} thread(s), "
             f"{trainer.device}, masker_every={args.masker_every}")
    text = markdown(per_label, per_cat, total, title)
    sort_key = "self_device_time_total" if trainer.device.type == "cuda" else "self_cpu_time_total"
    table = prof.key_averages().table(sort_by=sort_key, row_limit=args.top, max_name_column_width=60)
    print(text)
    print()
    print(table)
    if args.output:
        Path(args.output).write_text(text + "\n\n```\n" + table + "\n```\n")
    if args.trace:
        prof.export_chrome_trace(args.trace)
    return 0


if __name__ == "__main__":
    sys.exit(main())
