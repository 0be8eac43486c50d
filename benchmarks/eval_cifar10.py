"""Pretrain briefly with MAE and CL-MAE on a CIFAR-10 slice, then evaluate both and a random init.

All four protocols (k-NN, linear probe, few-shot, fine-tuning) run on each pretrained encoder; every
report carries the random-init reference of the same architecture and seed. Also measured: feature
extraction speed of ``vit_tiny_patch4_32`` on CIFAR-10 images and the time of the k-NN itself on
10,000 test × 50,000 train features (random features of the tiny model's width, 192).

Sized for a few busy CPU cores (default ≈ 10–15 min): a narrower, shallower model than
``vit_tiny_patch4_32`` (``vit_mini_patch4_32``: width 128, depth 6, in the model registry), 2,000
training images, 3 epochs. The numbers show that the pipeline works end to end, not what
CL-MAE reaches with a real budget.

    .venv/bin/python benchmarks/eval_cifar10.py --data-dir /work/shared/datasets --threads 1
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from clmae.evaluation.compare import comparison_table, format_markdown, format_terminal, plot_comparison
from clmae.evaluation.protocols import knn_class_scores
from clmae.evaluation.results import summary_lines
from clmae.evaluation.runner import (
    EvalOptions,
    prepare,
    protocol_config,
    run_protocol,
)
from clmae.models.configs import MODEL_CONFIGS, ModelConfig
from clmae.models.mae import MaskedAutoencoderViT
from clmae.runtime import resolve_device
from clmae.train.trainer import pretrain

REPO = Path(__file__).resolve().parents[1]
MINI = "vit_mini_patch4_32"


def register_mini() -> None:
    """Kept for older clmae versions: the registry has this model (32px/patch-4 grid, width 128, depth 6)."""
    MODEL_CONFIGS.setdefault(MINI, ModelConfig(
        img_size=32, patch_size=4, in_chans=3, embed_dim=128, depth=6, num_heads=4,
        decoder_embed_dim=64, decoder_depth=2, decoder_num_heads=4, masker_depth=2,
    ))


def git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, check=True).stdout.strip()
    except Exception:  # noqa: BLE001 — not a checkout
        return "unknown"


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data-dir", default="/work/shared/datasets")
    p.add_argument("--model", default=MINI, help=f"pretraining model ({MINI} is registered by this script)")
    p.add_argument("--subset", type=int, default=2000, help="training images for pretraining and the frozen protocols")
    p.add_argument("--test", type=int, default=1000, help="test images for every protocol")
    p.add_argument("--epochs", type=int, default=3, help="pretraining epochs")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--finetune-train", type=int, default=1000, help="training images for fine-tuning")
    p.add_argument("--finetune-epochs", type=int, default=2)
    p.add_argument("--speed-images", type=int, default=1000, help="CIFAR-10 images for the extraction-speed test")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--device", default="auto")
    p.add_argument("--runs-dir", default=None, help="where the pretraining runs go (default: a temporary folder)")
    p.add_argument("--output", default=str(REPO / "benchmarks/results/eval_cifar10.json"))
    p.add_argument("--speed-output", default=str(REPO / "benchmarks/results/eval_cifar10_speed.json"))
    p.add_argument("--plot", default=str(REPO / "benchmarks/results/eval_cifar10.png"))
    p.add_argument("--skip-speed", action="store_true")
    p.add_argument("--speed-only", action="store_true", help="only the speed measurements")
    return p.parse_args()


def environment(args: argparse.Namespace, device: torch.device) -> dict:
    return {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "device": str(device) + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else
                                 f" ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"),
        "torch_threads": torch.get_num_threads(),
        "load_average_at_start": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "git_commit": git("rev-parse", "HEAD"),
        "git_dirty": bool(git("status", "--porcelain", "--untracked-files=no")),
        "date": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }


def pretrain_runs(args, runs_dir: Path) -> dict[str, dict]:
    runs = {}
    for method in ("mae", "clmae"):
        out = runs_dir / f"{method}-cifar10"
        start = time.perf_counter()
        log(f"pretraining {method}: {args.model}, {args.subset} images, {args.epochs} epochs")
        result = pretrain(data="cifar10", data_dir=args.data_dir, subset=args.subset, model=args.model, method=method,
                          epochs=args.epochs, batch_size=args.batch_size, warmup_epochs=1, seed=0,
                          device=args.device, output_dir=str(out), progress=False, log_every=20,
                          probe_every=0, snapshot_every=0)
        seconds = time.perf_counter() - start
        runs[method] = {"run_dir": str(out), "seconds": round(seconds, 1), "final": result.final,
                        "img_per_s": round(args.subset * args.epochs / seconds, 1)}
        log(f"  {method}: {seconds:.0f} s, final {result.final.get('loss_mae', float('nan')):.4f} loss_mae")
    return runs


def evaluate_runs(args, runs: dict[str, dict]) -> list[dict]:
    configs = {
        "knn": protocol_config("knn"),
        "linear": protocol_config("linear", epochs=20),
        "fewshot": protocol_config("fewshot", shots=(1, 5, 10), draws=5, steps=200),
        "finetune": protocol_config("finetune", epochs=args.finetune_epochs, batch_size=64, warmup_epochs=0.5),
    }
    reports = []
    for method, run in runs.items():
        common = dict(device=args.device, progress=False, num_workers=0, max_test=args.test)
        frozen = prepare(run["run_dir"], "cifar10", args.data_dir, EvalOptions(max_train=args.subset, **common))
        tuned = prepare(run["run_dir"], "cifar10", args.data_dir, EvalOptions(max_train=args.finetune_train, **common))
        for protocol, cfg in configs.items():
            start = time.perf_counter()
            report = run_protocol(tuned if protocol == "finetune" else frozen, protocol, cfg)
            report["label"] = f"{method} ({args.epochs} ep)"
            report["seconds"] = round(time.perf_counter() - start, 1)
            reports.append(report)
            log(f"  {method} {protocol}: {report['seconds']:.0f} s")
            for line in summary_lines(report):
                print(line, flush=True)
    return reports


def speed(args, device: torch.device) -> dict:
    """Feature extraction img/s of vit_tiny_patch4_32 and the time of k-NN on 10k × 50k features."""
    from clmae.data.datasets import load_dataset
    from clmae.evaluation.features import extract_features
    from clmae.evaluation.splits import eval_batches, labeled_split

    out: dict = {}
    train = load_dataset("cifar10", args.data_dir, "train")
    split = labeled_split(train, "train", args.speed_images, 0)
    for name in ("vit_tiny_patch4_32", args.model):
        if name in out:
            continue
        torch.manual_seed(0)
        model = MaskedAutoencoderViT(MODEL_CONFIGS[name]).to(device).eval()
        # warm-up batch, then the timed pass
        extract_features(model, eval_batches(labeled_split(train, "train", 64, 1), 32, train.mean, train.std, device,
                                             64), "cls", device)
        start, cpu = time.perf_counter(), time.process_time()
        feats, _ = extract_features(model, eval_batches(split, 32, train.mean, train.std, device, 256), "cls", device)
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        out[f"extract_{name}"] = {"images": len(split), "seconds": round(seconds, 2),
                                  "cpu_seconds": round(time.process_time() - cpu, 2),
                                  "img_per_s": round(len(split) / seconds, 1), "feature_dim": feats.shape[1],
                                  "note": f"a random {len(split)}-image slice of CIFAR-10 train, batch 256, "
                                          f"cls pooling; the full 60,000 would take "
                                          f"≈{60000 * seconds / len(split) / 60:.1f} min"}
        log(f"  extraction {name}: {len(split) / seconds:.0f} img/s")
    g = torch.Generator().manual_seed(0)
    bank, queries = torch.randn(50_000, 192, generator=g), torch.randn(10_000, 192, generator=g)
    labels = torch.randint(0, 10, (50_000,), generator=g)
    for metric, k in (("euclidean", 5), ("cosine", 20)):
        start, cpu = time.perf_counter(), time.process_time()
        knn_class_scores(bank, labels, queries, 10, k, metric, device=device)
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        out[f"knn_{metric}_k{k}"] = {"train": 50_000, "test": 10_000, "dim": 192, "seconds": round(seconds, 2),
                                     "cpu_seconds": round(time.process_time() - cpu, 2)}
        log(f"  k-NN {metric} k={k}: {seconds:.2f} s wall, {time.process_time() - cpu:.2f} s CPU")
    return out


def main() -> int:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    register_mini()
    device = resolve_device(args.device)
    env = environment(args, device)
    start = time.perf_counter()
    if args.speed_only:
        Path(args.speed_output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.speed_output).write_text(json.dumps({"benchmark": "eval_cifar10_speed", **env, **speed(args, device)},
                                                      indent=2) + "\n")
        return 0
    with tempfile.TemporaryDirectory(prefix="clmae-bench-") as tmp:
        runs_dir = Path(args.runs_dir) if args.runs_dir else Path(tmp)
        runs = pretrain_runs(args, runs_dir)
        reports = evaluate_runs(args, runs)
        speed_results = None if args.skip_speed else speed(args, device)
    for report in reports:  # temporary run folders: keep the folder name only
        report["checkpoint"] = str(Path(report["checkpoint"]).name)

    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    summary = {"benchmark": "eval_cifar10", **env, "total_seconds": None,
               "settings": {k: v for k, v in vars(args).items() if k not in ("output", "speed_output", "plot")},
               "model_config": dataclasses.asdict(MODEL_CONFIGS[args.model]), "pretraining": runs, "reports": reports}
    out.write_text(json.dumps(summary, indent=2, default=str) + "\n")
    table = comparison_table([out])
    plot_comparison(table, args.plot)
    summary["table_markdown"] = format_markdown(table)
    summary["total_seconds"] = round(time.perf_counter() - start, 1)
    out.write_text(json.dumps(summary, indent=2, default=str) + "\n")
    if speed_results is not None:
        Path(args.speed_output).write_text(json.dumps({"benchmark": "eval_cifar10_speed", **env, **speed_results},
                                                      indent=2) + "\n")
    print()
    print(format_terminal(table))
    print()
    print(summary["table_markdown"])
    log(f"done in {summary['total_seconds']:.0f} s; results in {out}" +
        ("" if speed_results is None else f" and {args.speed_output}"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
