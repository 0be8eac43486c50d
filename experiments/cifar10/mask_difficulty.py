"""How hard are each arm's masks, judged by an MAE that never trained on them?

The in-run probe (``mask_difficulty``) divides a CL-MAE's loss under its own learned masks by its loss
under random masks. That MAE has only ever been trained on learned masks, so the ratio mixes two things:
how hard the masks are, and how used to them the MAE is. Here every arm's masks are also scored by a
*reference* MAE, the study's ``mae`` arm of the same seed (trained on random masks only). Every arm whose
masks are not uniformly random is measured (every method other than ``mae``: CL-MAE, hpm, attmask, block);
``mae`` arms, the equal-compute one included, have nothing to measure::

    python experiments/cifar10/mask_difficulty.py                 # after run.py; reads OUT/results.json
    python experiments/cifar10/mask_difficulty.py --output experiments/cifar10/quick

For each such arm and seed, on the first ``--images`` test images (evaluation view, the run's
normalisation), it reports:

* ``reference_ratio``: the reference MAE's loss under the arm's learned masks / under random masks
  (``--draws`` random masks, seeded): above 1 means harder than random for a standard MAE;
* ``own_ratio``: the same ratio for the arm's own MAE (what the in-run probe measures);
* ``hidden_to_visible``: the mean grid distance from a hidden patch to its nearest visible patch, learned
  vs random masks (larger = hidden patches come in bigger blocks, which is harder to paint in).

Writes ``OUT/mask_difficulty.json`` and ``OUT/mask_difficulty.md``.
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent


def visible_mask(keep: torch.Tensor, num_patches: int) -> torch.Tensor:
    """Boolean ``(N, L)``: True where the patch is visible."""
    return torch.zeros(keep.shape[0], num_patches, dtype=torch.bool).scatter(1, keep, True)


def hidden_to_visible_distance(visible: torch.Tensor) -> float:
    """Mean Euclidean grid distance from each hidden patch to the nearest visible one (square grid)."""
    n, length = visible.shape
    side = int(round(length ** 0.5))
    rows, cols = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    grid = torch.stack([rows.flatten(), cols.flatten()], -1).float()
    dist = torch.cdist(grid, grid).expand(n, length, length).clone()
    dist.masked_fill_(~visible.unsqueeze(1), float("inf"))  # only visible patches can be the nearest
    return dist.min(-1).values[~visible].mean().item()


def random_keeps(n: int, num_patches: int, num_keep: int, draws: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(n, num_patches, generator=g).argsort(1)[:, :num_keep] for _ in range(draws)]


@functools.lru_cache(maxsize=4)
def test_images(data: str, data_dir: str | None, channels: int):
    """The test split, loaded once per dataset for all arms and seeds."""
    from clmae.data.datasets import load_dataset

    return load_dataset(data, data_dir, "test", channels)


class MeasureError(Exception):
    """A run folder this script cannot measure (reported as one ``mask_difficulty: error:`` line, exit 2)."""


@torch.no_grad()
def run_masks(mae, masker, run_cfg: dict[str, Any], x: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """The visible patches ``(N, K)`` this run's masking strategy picks for the normalised images ``x``.

    ``masker`` is what :func:`clmae.io.checkpoint.load_pretrained` returned (the strategy with its saved state);
    it chooses as it would in its last epoch (schedules such as HPM's hard share at their last value).
    """
    from clmae.maskers.base import strategy_masks

    if masker is None:
        raise MeasureError(f"the {run_cfg['method']} checkpoint gave no masker to measure; is it a run of this study?")
    masker.eval()
    epochs = int(run_cfg["epochs"])
    num_keep = mae.num_keep(run_cfg["mask_ratio"])
    last_epoch = float(epochs - 1)
    _, keep = strategy_masks(mae, masker, x, num_keep, torch.Generator().manual_seed(seed), last_epoch, epochs)
    return keep


def random_masks(run_cfg: dict[str, Any]) -> bool:
    """True for a run whose masks are uniformly random (nothing to measure)."""
    return run_cfg.get("method") == "mae"


@torch.no_grad()
def measure(run_dir: Path, reference: torch.nn.Module, images: int, draws: int) -> dict[str, float]:
    """The four numbers of one arm and seed; ``reference`` is the seed's random-mask MAE."""
    from clmae.data.images import normalize, resize_images
    from clmae.io.checkpoint import load_pretrained

    mae, masker, cfg = load_pretrained(run_dir)
    test = test_images(cfg["data"], cfg.get("data_dir"), mae.config.in_chans)
    info = cfg.get("data_info") or {}
    x = normalize(resize_images(test.images[:images], mae.config.img_size), info["mean"], info["std"])
    mae.eval()
    num_keep = mae.num_keep(cfg["mask_ratio"])
    learned = run_masks(mae, masker, cfg, x)
    randoms = random_keeps(x.shape[0], mae.num_patches, num_keep, draws, seed=0)

    def ratio(model) -> float:
        rand = statistics.fmean(model(x, keep)["loss"].item() for keep in randoms)
        return model(x, learned)["loss"].item() / rand

    return {
        "reference_ratio": ratio(reference),
        "own_ratio": ratio(mae),
        "hidden_to_visible_learned": hidden_to_visible_distance(visible_mask(learned, mae.num_patches)),
        "hidden_to_visible_random": statistics.fmean(
            hidden_to_visible_distance(visible_mask(keep, mae.num_patches)) for keep in randoms),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=HERE / "results", help="the study's results folder")
    parser.add_argument("--reference", default="mae", help="the arm whose MAE judges the masks")
    parser.add_argument("--images", type=int, default=512, help="test images to measure on")
    parser.add_argument("--draws", type=int, default=8, help="random masks for the baseline loss")
    args = parser.parse_args(argv)
    try:
        return measure_study(args)
    except MeasureError as exc:
        print(f"mask_difficulty: error: {exc}", file=sys.stderr)
        return 2


def measure_study(args: argparse.Namespace) -> int:
    """Measure every arm of ``args.output/results.json``; write mask_difficulty.json and .md."""
    torch.manual_seed(0)
    path = args.output / "results.json"
    if not path.exists():
        print(f"mask_difficulty: error: {path} does not exist; run experiments/cifar10/run.py first", file=sys.stderr)
        return 2
    study = json.loads(path.read_text())
    arms = study["arms"]
    if args.reference not in arms:
        print(f"mask_difficulty: error: no {args.reference!r} arm in {path}", file=sys.stderr)
        return 2
    from clmae.io.checkpoint import load_pretrained

    table: dict[str, dict[str, Any]] = {arm: {} for arm in arms if arm != args.reference}
    uniform = set()
    for seed, ref_run in arms[args.reference].items():
        reference = load_pretrained(args.output / ref_run["run_dir"])[0].eval()  # once per seed, for every arm
        for arm in table:
            if seed not in arms[arm]:
                continue
            run_config = json.loads((args.output / arms[arm][seed]["run_dir"] / "config.json").read_text())
            if random_masks(run_config["run_config"]):
                uniform.add(arm)
                continue
            row = measure(args.output / arms[arm][seed]["run_dir"], reference, args.images, args.draws)
            table[arm][seed] = row
            print(f"[mask_difficulty] {arm} seed {seed}: " + ", ".join(f"{k} {v:.3f}" for k, v in row.items()),
                  file=sys.stderr)
    table = {arm: rows for arm, rows in table.items() if rows}  # arms without a seed in common are left out
    (args.output / "mask_difficulty.json").write_text(json.dumps(
        {"reference": args.reference, "images": args.images, "draws": args.draws, "arms": table,
         "not_measured_uniform_random": sorted(uniform)}, indent=2))
    lines = ["| arm | arm's/random masks loss, reference MAE | arm's/random masks loss, own MAE | "
             "hidden→nearest visible, arm's masks | same, random masks |", "|---|---|---|---|---|"]
    for arm, seeds in table.items():
        cells = [arm]
        for key in ("reference_ratio", "own_ratio", "hidden_to_visible_learned", "hidden_to_visible_random"):
            values = [row[key] for row in seeds.values()]
            spread = f" ± {statistics.stdev(values):.3f}" if len(values) > 1 else ""
            cells.append(f"{statistics.fmean(values):.3f}{spread}")
        lines.append("| " + " | ".join(cells) + " |")
    text = (f"# Mask difficulty judged by the `{args.reference}` arm's MAE\n\n"
            f"Test images: {args.images}; random baseline: {args.draws} seeded masks; mean ± std over seeds.\n\n"
            + "\n".join(lines) + "\n")
    if uniform:
        text += f"\nNot measured (uniformly random masks, a ratio of 1 by construction): {', '.join(sorted(uniform))}\n"
    (args.output / "mask_difficulty.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
