"""benchmarks/gpu.py, the one command a GPU lease runs, works before a GPU exists: ``--device cpu --quick``.

The same code as on a GPU, on tiny settings (vit_micro, digits-sized synthetic images): every section runs and
writes what it promises. On the CPU the "device" is the CPU, so the parity check compares two CPU runs (equal
to the bit) and the CUDA synchronisation count says it does not apply.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))
import gpu  # noqa: E402 — a script in benchmarks/, importable only after the path insert


def test_the_gpu_script_runs_every_section_on_the_cpu(tmp_path, capsys):
    out = tmp_path / "gpu.json"
    assert gpu.main(["--device", "cpu", "--quick", "--output", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["ok"] and res["quick"] and res["environment"]["device"] == "cpu" and "commit" in res["environment"]
    for name in ("matmul_peak", "parity", "precisions", "syncs", "ddp", "evaluation", "jpeg_decode", "throughput"):
        assert "error" not in res[name] and "skipped" not in res[name], (name, res[name])
    assert res["matmul_peak"]["peak_of"] == "fp32" and res["matmul_peak"]["peak_flop_s"] > 0
    parity = res["parity"]["strategies"]
    assert set(parity) == set(gpu.STRATEGIES)
    assert all(p["same_initial_weights"] and p["max_rel_diff"] == 0.0 for p in parity.values())  # CPU vs CPU
    runs = res["precisions"]["runs"]
    assert set(runs) == {"mae/bf16", "mae/fp16", "clmae/bf16", "clmae/fp16"}
    assert all(r["losses_finite"] and r["first_step_within_tolerance"] for r in runs.values())
    assert "loss_scale_masker" in runs["clmae/fp16"] and "loss_scale_mae" in runs["mae/fp16"]
    assert "not_applicable" in res["syncs"]
    assert res["ddp"]["backend"] == "gloo" and res["ddp"]["wrapped_in"] == "DistributedDataParallel"
    assert res["ddp"]["same_as_without_ddp"] and res["ddp"]["iterations"] == 2
    knn = res["evaluation"]["cpu"]["knn"]["knn_weighted_top1"]
    assert math.isfinite(knn) and "linear_top1" in res["evaluation"]["cpu"]["linear"]
    decode = res["jpeg_decode"]  # on the CPU: the same decoder both ways
    assert decode["ok"] and decode["mean_abs_diff_vs_cpu"] == 0 and decode["truncated_file_skipped"]
    throughput = res["throughput"]["runs"]
    assert set(throughput) == {f"vit_micro_patch2_8/{v}/eager" for v in gpu.VARIANTS}  # no --compile in --quick
    assert all(r["img_per_s"] > 0 and r["flops_per_iteration"] > 0 and r["frac_of_peak"] > 0
               for r in throughput.values())
    assert throughput["vit_micro_patch2_8/clmae/eager"]["flops_per_iteration"] > \
        throughput["vit_micro_patch2_8/clmae_cheap/eager"]["flops_per_iteration"] > \
        throughput["vit_micro_patch2_8/mae/eager"]["flops_per_iteration"]
    printed = capsys.readouterr().out
    assert "all checks passed" in printed and "parity" in printed and "vit_micro_patch2_8/clmae/eager" in printed
    check_study_estimate_from(out, throughput)


def check_study_estimate_from(result: Path, throughput: dict) -> None:
    """experiments/cifar10/run.py's gpu-short estimate reads the rates this JSON measured, per arm's variant."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "experiments" / "cifar10" / "run.py"
    spec = importlib.util.spec_from_file_location("cifar10_study_for_gpu", path)
    study = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(study)
    budget = {**study.load_config("gpu-short")["budget"], "measured_rates": str(result)}
    measured = study.measured_gpu_rates(budget, "vit_micro_patch2_8", 16)
    assert measured["rates"] == {v: throughput[f"vit_micro_patch2_8/{v}/eager"]["img_per_s"] for v in gpu.VARIANTS}
    arms = ["mae", "mae_equal_compute", "clmae", "clmae_cheap"]
    cfg = study.load_config("gpu-short")
    per_image = {"mae": 1.0, "mae_equal_compute": 1.0, "clmae": 4.0, "clmae_cheap": 1.5}
    base = {**cfg["pretrain"], "model": "vit_micro_patch2_8", "batch_size": 16, "epochs": 2, "eval_every": 0}
    plan = study.plan_arms(cfg, arms, base, per_image)
    est = study.estimate(plan, per_image, dict.fromkeys(arms, "measured"), "mae", budget, 160, 1)
    rate = measured["rates"]
    assert est["arms"]["clmae"]["gpu_s"] == 160 * 2 / rate["clmae"]
    assert est["arms"]["mae_equal_compute"]["gpu_s"] == 160 * 8 / rate["mae"]  # 4x the epochs at MAE's rate
    assert "ESTIMATED GPU time" in study.format_estimate(est) and str(result) in study.format_estimate(est)
