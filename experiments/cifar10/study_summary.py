"""The study's results.md and curves.png, from results.json alone (run.py and ``run.py --summarise``).

Statistics: every arm minus the reference arm (MAE), paired by seed (same data order, crops and initial
weights within a seed), as the mean difference with a 95% Student-t interval over seeds (df = n − 1).
An interval that excludes 0 is a difference distinguishable from seed noise at that level; one that
includes 0 is not. The t quantile is computed here (no scipy).
"""

from __future__ import annotations

import functools
import math
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Metrics reported per arm (from the evaluation JSONs): (protocol, name in report) → column title.
METRICS = {
    ("knn", "knn_majority_top1"): "k-NN k=5 (authors)",
    ("knn", "knn_weighted_top1"): "k-NN k=20 weighted",
    ("linear", "linear_top1"): "linear probe",
    ("fewshot", "fewshot_10shot_top1"): "10-shot",
}


# ---------------------------------------------------------------------------------------------
# Statistics


def t_density(x: float, df: int) -> float:
    """Student's t density with ``df`` degrees of freedom."""
    log_c = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)
    return math.exp(log_c - (df + 1) / 2 * math.log1p(x * x / df))


def t_cdf(t: float, df: int) -> float:
    """P(T ≤ t) for ``t`` ≥ 0: 1/2 plus Simpson's rule on the density over [0, t] (smooth: far below 1e-6 off)."""
    steps = 4000
    h = t / steps
    inner = sum((4 if i % 2 else 2) * t_density(i * h, df) for i in range(1, steps))
    return 0.5 + (t_density(0.0, df) + t_density(t, df) + inner) * h / 3


def t_series(z: float, df: int) -> float:
    """Cornish–Fisher expansion of the t quantile around the normal one ``z`` (Abramowitz & Stegun 26.7.5)."""
    g1 = (z ** 3 + z) / 4
    g2 = (5 * z ** 5 + 16 * z ** 3 + 3 * z) / 96
    g3 = (3 * z ** 7 + 19 * z ** 5 + 17 * z ** 3 - 15 * z) / 384
    g4 = (79 * z ** 9 + 776 * z ** 7 + 1482 * z ** 5 - 1920 * z ** 3 - 945 * z) / 92160
    return z + g1 / df + g2 / df ** 2 + g3 / df ** 3 + g4 / df ** 4


@functools.lru_cache(maxsize=256)
def t_quantile(df: int, p: float = 0.975) -> float:
    """The ``p`` quantile (p > 0.5) of Student's t with ``df`` ≥ 1 degrees of freedom.

    Above 30 degrees of freedom the expansion alone is good to 1e-5; below, Newton's method on the
    numerically integrated CDF refines it (the CDF is concave for t > 0, so from the expansion, which
    lies below the quantile, the steps approach it from below).
    """
    if df < 1 or not 0.5 < p < 1:
        raise ValueError(f"t_quantile needs df >= 1 and 0.5 < p < 1, got df={df}, p={p}")
    t = t_series(statistics.NormalDist().inv_cdf(p), df)
    if df > 30:
        return t
    for _ in range(100):
        step = (t_cdf(t, df) - p) / t_density(t, df)
        t -= step
        if abs(step) < 1e-9:
            break
    return t


@dataclass(frozen=True)
class Interval:
    """Mean of paired differences over seeds and its 95% t-interval (``half`` is None with one seed)."""

    n: int
    mean: float
    sd: float | None
    half: float | None

    @property
    def lo(self) -> float | None:
        return None if self.half is None else self.mean - self.half

    @property
    def hi(self) -> float | None:
        return None if self.half is None else self.mean + self.half

    @property
    def excludes_zero(self) -> bool | None:
        """True: distinguishable from seed noise at 95%; False: not; None: one seed, no interval."""
        return None if self.half is None else (self.lo > 0 or self.hi < 0)

    def cell(self, digits: int = 2) -> str:
        if self.half is None:
            return f"{self.mean:+.{digits}f} (1 seed)"
        mark = " *" if self.excludes_zero else ""
        return f"{self.mean:+.{digits}f} [{self.lo:+.{digits}f}, {self.hi:+.{digits}f}]{mark}"


def interval(diffs: list[float]) -> Interval | None:
    """Mean and 95% t-interval of paired differences (None without any)."""
    if not diffs:
        return None
    n, mean = len(diffs), statistics.fmean(diffs)
    if n == 1:
        return Interval(1, mean, None, None)
    sd = statistics.stdev(diffs)
    return Interval(n, mean, sd, t_quantile(n - 1) * sd / math.sqrt(n))


def seeds_to_resolve(mean: float, sd: float, limit: int = 1000) -> int | None:
    """Smallest number of seeds whose 95% interval half-width t(n−1)·sd/√n is below |mean| (None: over ``limit``)."""
    if sd == 0:
        return 2
    for n in range(2, limit + 1):
        if t_quantile(n - 1) * sd / math.sqrt(n) < abs(mean):
            return n
    return None


# ---------------------------------------------------------------------------------------------
# Reading results.json


def metric_value(run: dict[str, Any], key: tuple[str, str], role: str = "pretrained") -> float | None:
    return ((run["metrics"].get(key[0]) or {}).get(role) or {}).get(key[1])


def metric_key(title: str) -> tuple[str, str]:
    for key, name in METRICS.items():
        if name == title:
            return key
    raise KeyError(f"verdict_metric {title!r} is not one of {', '.join(METRICS.values())}")


def train_rate(run: dict[str, Any]) -> float | None:
    return (run.get("curves") or {}).get("train_img_per_s")


def paired(results: dict[str, Any], arm: str, other: str, value) -> list[float]:
    """``value(run)`` of ``arm`` minus that of ``other``, for every seed both have (and both values exist)."""
    arms = results["arms"]
    diffs = []
    for seed, run in arms.get(arm, {}).items():
        if seed in arms.get(other, {}):
            mine, theirs = value(run), value(arms[other][seed])
            if mine is not None and theirs is not None:
                diffs.append(mine - theirs)
    return diffs


def ratios(results: dict[str, Any], arm: str, other: str, value, other_value=None) -> list[float]:
    """``value(run)`` of ``arm`` over ``other_value(run)`` (default: ``value``) of ``other``, paired by seed."""
    arms = results["arms"]
    other_value = other_value or value
    out = []
    for seed, run in arms.get(arm, {}).items():
        if seed in arms.get(other, {}):
            mine, theirs = value(run), other_value(arms[other][seed])
            if mine and theirs:
                out.append(mine / theirs)
    return out


def flops_per_image(results: dict[str, Any], arm: str) -> float | None:
    return (((results.get("compute") or {}).get("arms") or {}).get(arm) or {}).get("flops_per_image")


def training_flops(results: dict[str, Any], arm: str):
    """run → its training FLOPs (FLOPs per image × images trained), or None without a FLOP count."""
    per_image = flops_per_image(results, arm)
    return lambda run: None if per_image is None else per_image * run["timing"]["images"]


def training_seconds(run: dict[str, Any]) -> float | None:
    """Images trained / median train img/s of the log windows: the wall-clock without the k-NN passes."""
    rate = train_rate(run)
    return run["timing"]["images"] / rate if rate else None


def cost_ratios(results: dict[str, Any], arm: str, reference: str) -> tuple[list[float], list[float]]:
    """Per seed: (training FLOPs / reference's, training wall-clock / reference's)."""
    flop = ratios(results, arm, reference, training_flops(results, arm), training_flops(results, reference))
    return flop, ratios(results, arm, reference, training_seconds)


def cost(results: dict[str, Any], arm: str, reference: str) -> tuple[str, str]:
    """(training FLOPs × reference, training wall-clock × reference), paired by seed: mean (± std if they vary)."""
    return tuple(mean_std(values, digits=2, suffix="×", spread_if_varies=True)
                 for values in cost_ratios(results, arm, reference))


def mean_std(values: list[float], digits: int = 2, signed: bool = False, suffix: str = "",
             spread_if_varies: bool = False) -> str:
    """``mean ± std``; only the mean for one value (or, with ``spread_if_varies``, for a std that rounds to 0)."""
    if not values:
        return "n/a"
    mean = statistics.fmean(values)
    sign = "+" if signed else ""
    if len(values) == 1 or (spread_if_varies and round(statistics.stdev(values), digits) == 0):
        return f"{mean:{sign}.{digits}f}{suffix}"
    return f"{mean:{sign}.{digits}f}{suffix} ± {statistics.stdev(values):.{digits}f}"


def arm_epochs(results: dict[str, Any], arm: str) -> str:
    plan = (results.get("plan") or {}).get(arm)
    if plan:
        return str(plan["epochs"])
    return str(results.get("pretrain", {}).get("epochs", "?"))


def describe_arm(results: dict[str, Any], arm: str) -> str:
    plan = (results.get("plan") or {}).get(arm)
    if not plan:
        return ""
    extra = ", ".join(f"{k} {v}" for k, v in plan["overrides"].items() if k != "method")
    text = f"`{plan['method']}`" + (f" ({extra})" if extra else "")
    if plan.get("equal_compute_with"):
        text += f", epochs set to match {plan['equal_compute_with']}'s training FLOPs"
    return text


# ---------------------------------------------------------------------------------------------
# Tables


PHASES = ("first third", "middle third", "last third")


def probe_phases(probe: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    """The probe records of a run in thirds of training (by record, in step order; the first, at step 0, left out:
    it measures the untrained masker)."""
    records = sorted(probe, key=lambda r: r["step"])[1:]
    n = len(records)
    return [records[i * n // 3:(i + 1) * n // 3] for i in range(3)] if n >= 3 else []


def masks_table(results: dict[str, Any]) -> str:
    """The probe's view of each strategy's masks during its own pretraining, per third of the run, mean ± std over
    seeds: its schedule's λ, its masks' MAE loss ÷ random masks', and ÷ another probe image's mask's (the same mask
    distribution, so the MAE's familiarity with that distribution cancels)."""
    rows = []
    for arm, seeds in results["arms"].items():
        per_phase: list[dict[str, list[float]]] = [{} for _ in PHASES]
        for run in seeds.values():
            for phase, records in zip(per_phase, probe_phases(run.get("curves", {}).get("probe") or [])):
                for key in ("curriculum_factor", "mask_difficulty", "mask_difficulty_shuffled"):
                    values = [r[key] for r in records if r.get(key) is not None and math.isfinite(r[key])]
                    if values:
                        phase.setdefault(key, []).append(statistics.fmean(values))
        for name, phase in zip(PHASES, per_phase):
            if phase.get("mask_difficulty"):
                lam = mean_std(phase.get("curriculum_factor", []), signed=True, spread_if_varies=True)
                rows.append([arm, name, lam,
                             mean_std(phase["mask_difficulty"]), mean_std(phase.get("mask_difficulty_shuffled", [])),
                             str(len(phase["mask_difficulty"]))])
    if not rows:
        return ""
    return table(["arm", "part of the run", "λ", "mask ÷ random mask (MAE loss)", "mask ÷ another image's mask",
                  "seeds"], rows)


def row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def table(header: list[str], rows: list[list[str]]) -> str:
    return "\n".join([row(header), "|" + "---|" * len(header), *(row(r) for r in rows)])


def compute_table(results: dict[str, Any], reference: str) -> str:
    rows = []
    for arm, seeds in results["arms"].items():
        flop, wall = cost(results, arm, reference)
        rows.append([arm, describe_arm(results, arm), arm_epochs(results, arm), flop, wall,
                     mean_std([r for r in map(train_rate, seeds.values()) if r], digits=0),
                     mean_std([s["timing"]["wall_s"] / 60 for s in seeds.values()], digits=1)])
    return table(["arm", "masking", "epochs", f"training FLOPs (× {reference})", f"training wall (× {reference})",
                  "train img/s", "pretraining wall (min)"], rows)


def total_time(results: dict[str, Any]) -> str:
    """How long the study took: the whole-run pretraining wall of every arm x seed, summed (evaluation excluded).

    Runs may have shared the machine or run side by side, so this is machine time spent, not elapsed time."""
    walls = [run["timing"]["wall_s"] for seeds in results["arms"].values() for run in seeds.values()]
    if not walls:
        return ""
    seconds = sum(walls)
    return (f"Total: {len(walls)} arm × seed runs, {seconds / 3600:.1f} h ({seconds / 60:.0f} min) of pretraining "
            "wall summed over runs (evaluation excluded; runs side by side each count their own wall), on "
            f"{results.get('device', '?')} with {results.get('threads', '?')} thread(s) per run.")


def accuracy_table(results: dict[str, Any]) -> str:
    rows = []
    for arm, seeds in results["arms"].items():
        cells = [arm, arm_epochs(results, arm)]
        for key in METRICS:
            cells.append(mean_std([v for v in (metric_value(s, key) for s in seeds.values()) if v is not None]))
        rows.append(cells)
    cells = ["random init (reference)", "0"]
    for key in METRICS:  # the encoder every arm of a seed started from: once per seed
        per_seed: dict[str, float] = {}
        for seeds in results["arms"].values():
            for seed, run in seeds.items():
                value = metric_value(run, key, "random_init")
                if value is not None:
                    per_seed.setdefault(seed, value)
        cells.append(mean_std(list(per_seed.values())))
    rows.append(cells)
    return table(["arm", "epochs", *METRICS.values()], rows)


def difference_table(results: dict[str, Any], reference: str, cost_reference: str) -> str:
    """Every arm minus ``reference`` per metric (mean [95% interval]), with its cost relative to ``cost_reference``."""
    rows = []
    for arm in results["arms"]:
        if arm == reference:
            continue
        cells = [arm]
        for key in METRICS:
            iv = interval(paired(results, arm, reference, lambda run, k=key: metric_value(run, k)))
            cells.append(iv.cell() if iv else "n/a")
        cells.extend(cost(results, arm, cost_reference))
        rows.append(cells)
    header = ["arm", *(f"Δ {title}" for title in METRICS.values()), f"training FLOPs (× {cost_reference})",
              f"training wall (× {cost_reference})"]
    return table(header, rows)


# ---------------------------------------------------------------------------------------------
# Words


def noise_words(iv: Interval | None) -> str:
    if iv is None:
        return "no paired seeds"
    if iv.excludes_zero is None:
        return "one seed: no interval, nothing can be said about noise"
    if iv.excludes_zero:
        return "the interval excludes 0: distinguishable from seed noise"
    return "the interval includes 0: not distinguishable from seed noise"


def distinguishable(results: dict[str, Any], reference: str) -> list[str]:
    """One line per arm: which metrics differ from ``reference`` beyond seed noise, which do not."""
    lines = []
    for arm in results["arms"]:
        if arm == reference:
            continue
        beyond, within, single = [], [], []
        for key, title in METRICS.items():
            iv = interval(paired(results, arm, reference, lambda run, k=key: metric_value(run, k)))
            if iv is None:
                continue
            if iv.excludes_zero is None:
                single.append(title)
            elif iv.excludes_zero:
                beyond.append(f"{title} ({iv.mean:+.2f})")
            else:
                within.append(title)
        if single:
            lines.append(f"- **{arm}**: one seed only, no interval ({', '.join(single)}).")
            continue
        parts = []
        if beyond:
            parts.append("differs beyond seed noise on " + ", ".join(beyond))
        if within:
            parts.append("is within seed noise on " + ", ".join(within))
        lines.append(f"- **{arm}** " + "; ".join(parts or ["has no paired numbers"]) + ".")
    return lines


COMPARABLE_COMPUTE = 0.10  # an arm within 10% of an equal-compute arm's training FLOPs gets its own sentence


def equal_compute_arms(results: dict[str, Any]) -> dict[str, str]:
    """``{arm: target}`` for every arm with results trained for another arm's FLOPs (``equal_compute_with``),
    the config's ``equal_compute_arm`` first: e.g. MAE at CL-MAE's compute and MAE at the cheap CL-MAE's."""
    plan = results.get("plan") or {}
    primary = results.get("equal_compute_arm", "mae_equal_compute")
    return {arm: plan[arm]["equal_compute_with"] for arm in dict.fromkeys([primary, *plan])
            if arm in results["arms"] and (plan.get(arm) or {}).get("equal_compute_with")}


def equal_compute_pairs(results: dict[str, Any], equals: dict[str, str]) -> list[tuple[str, str, bool]]:
    """``(arm, equal-compute arm, exact)`` for every arm that has an equal-compute counterpart among ``equals``
    (:func:`equal_compute_arms`): the arm each equal-compute arm was sized for (exact), then, in results order,
    every other arm within ``COMPARABLE_COMPUTE`` of an equal-compute arm's training FLOPs (the nearest one)."""
    reference = results.get("reference_arm", "mae")
    pairs = [(target, equal, True) for equal, target in equals.items() if target in results["arms"]]
    sized = {arm for arm, _, _ in pairs}
    for arm in results["arms"]:
        if arm == reference or arm in equals or arm in sized:
            continue
        off = {equal: abs(statistics.fmean(flop) - 1)
               for equal in equals if (flop := cost_ratios(results, arm, equal)[0])}
        near = [(gap, equal) for equal, gap in off.items() if gap <= COMPARABLE_COMPUTE]
        if near:
            pairs.append((arm, min(near)[1], False))
    return pairs


def verdict(results: dict[str, Any]) -> list[str]:
    """The generated verdict: equal compute (each arm against MAE trained for its training FLOPs, exactly or
    within ``COMPARABLE_COMPUTE``), equal epochs, what would change it."""
    reference = results.get("reference_arm", "mae")
    equal = results.get("equal_compute_arm", "mae_equal_compute")
    title = results.get("verdict_metric", "linear probe")
    key = metric_key(title)
    lines = []
    equals = equal_compute_arms(results)
    pairs = equal_compute_pairs(results, equals)
    for arm, against, exact in pairs:
        lines += [*equal_compute_lines(results, arm, against, reference, title, key, exact=exact), ""]
    if not pairs:
        target = ((results.get("plan") or {}).get(equal) or {}).get("equal_compute_with")
        lines += [f"**Equal compute.** The study has no {equal} arm" + (f" or no {target} arm" if target else "")
                  + " to compare.", ""]
    skip = {reference, equal, *equals}
    beyond, within = [], []
    for arm in results["arms"]:
        if arm in skip:
            continue
        iv = interval(paired(results, arm, reference, lambda run: metric_value(run, key)))
        if iv is None or iv.excludes_zero is None:
            continue
        (beyond if iv.excludes_zero else within).append(f"{arm} ({iv.cell()})")
    epochs = arm_epochs(results, reference)
    lines.append(f"**Equal epochs ({epochs}).** On {title}, minus MAE paired by seed: beyond seed noise (95% interval "
                 f"excludes 0): {', '.join(beyond) or 'none'}; within seed noise: {', '.join(within) or 'none'}.")
    return lines


def equal_compute_lines(results: dict[str, Any], arm: str, equal: str, reference: str, title: str, key: str,
                        exact: bool = True) -> list[str]:
    """The equal-compute sentence of one arm against ``equal`` (MAE trained for the FLOPs of ``equal``'s target:
    the arm's own when ``exact``, else within ``COMPARABLE_COMPUTE`` of them)."""
    iv = interval(paired(results, arm, equal, lambda run: metric_value(run, key)))
    if iv is None:
        return [f"**Equal compute.** No seed has both {arm} and {equal}."]
    flop, wall = (f"{statistics.fmean(v):.2f}×" if v else "n/a" for v in cost_ratios(results, arm, reference))
    epochs = f"{arm_epochs(results, equal)} instead of {arm_epochs(results, reference)} epochs"
    if iv.excludes_zero is None:
        outcome = "one seed only, so no interval: no verdict yet"
    elif iv.hi < 0:
        outcome = (f"the interval lies below 0: at equal compute MAE is better, so {arm}'s extra compute "
                   "is better spent on longer MAE training")
    elif iv.lo > 0:
        outcome = f"the interval lies above 0: {arm} is better than MAE even at equal compute"
    else:
        outcome = ("the interval includes 0: at equal compute the two are not distinguishable from seed noise; "
                   f"{arm}'s extra compute buys nothing measurable over spending it on longer MAE training")
    spread = "" if iv.half is None else f", 95% interval [{iv.lo:+.2f}, {iv.hi:+.2f}]"
    same = "the same" if exact else "about the same"
    return [f"**Equal compute.** With {same} training FLOPs ({arm} costs {flop} MAE's FLOPs and {wall} its "
            f"training wall-clock on {results.get('device', '?')} with {results.get('threads', '?')} thread(s); "
            f"MAE gets {epochs}), {arm} − MAE on {title} = {iv.mean:+.2f} points over {iv.n} seed(s){spread}: "
            f"{outcome}.", "", f"**What would change it ({arm}).** " + what_would_change(iv, arm)]


def what_would_change(iv: Interval, arm: str) -> str:
    if iv.half is None:
        return "Run at least 2 seeds (3 or more for a useful interval)."
    text = (f"With {iv.n} seeds the interval's half-width is ±{iv.half:.2f} points (seed-to-seed std of the paired "
            f"difference {iv.sd:.2f}); a true difference smaller than about that cannot be told from noise here. ")
    if iv.excludes_zero:
        text += ("The sign is settled at this scale; a different scale (more images, more epochs, a bigger model: "
                 "the gpu profile) could still change it.")
    else:
        needed = seeds_to_resolve(iv.mean, iv.sd)
        text += (f"Resolving the observed {iv.mean:+.2f} points at this spread would take about "
                 + (f"{needed} seeds" if needed else "more than 1000 seeds (it is as good as no difference)")
                 + "; a different scale (more images, more epochs, a bigger model: the gpu profile) could also "
                 f"separate {arm} from MAE.")
    return text


# ---------------------------------------------------------------------------------------------
# results.md and curves.png


def title_of(results: dict[str, Any]) -> str:
    data = results.get("data", "cifar10")
    return "CIFAR-10 study" if data == "cifar10" else f"Masking study on {Path(data).name}"


def write_summary(results: dict[str, Any], out: Path) -> str:
    """Write ``out/results.md``; return its text."""
    reference = results.get("reference_arm", "mae")
    equal = results.get("equal_compute_arm", "mae_equal_compute")
    pretrain = results.get("pretrain", {})
    parts = [
        f"# {title_of(results)}: is learned masking worth its compute? ({results.get('profile', results.get('mode'))})",
        f"Command: `{results['command']}` (commit {results['commit']}); data `{results.get('data', 'cifar10')}`, "
        f"{results.get('train_images', pretrain.get('subset'))} training images, model {pretrain.get('model')}, batch "
        f"{pretrain.get('batch_size')}; device {results.get('device', '?')}, {results.get('threads', '?')} thread(s); "
        f"seeds {results['seeds']}.",
        ("Every arm of a seed has the same data order, crops and initial weights; only the masking differs (and the "
         "number of epochs of the equal-compute arm). Accuracies in %." if results.get("edition", 1) >= 2 else
         "Every arm of a seed has the same data order and initial weights (this first-edition study did not share "
         "crops between arms). Accuracies in %."),
        "## Verdict", "\n".join(verdict(results)),
        "## Compute per arm",
        "Training FLOPs: counted with FlopCounterMode on the training loop (matmuls, convolutions, attention; "
        f"forward and backward) × images trained, relative to `{reference}` of the same seed. Training wall: images / "
        "median train img/s of the log windows (the between-epoch k-NN passes excluded), relative likewise, on this "
        "machine. Pretraining wall: the whole run, k-NN passes included.",
        compute_table(results, reference),
        total_time(results),
        "## All arms (mean ± std over seeds)",
        accuracy_table(results),
        f"## Equal epochs: each arm minus `{reference}`, paired by seed",
        "Percentage points: mean [95% t-interval over seeds, df = n − 1]; * marks an interval that excludes 0 "
        "(distinguishable from seed noise).",
        difference_table(results, reference, reference),
        "\n".join(distinguishable(results, reference)),
    ]
    targets = equal_compute_arms(results) or ({equal: None} if equal in results["arms"] else {})
    for against, target in targets.items():
        parts += [
            f"## Equal compute: each arm minus `{against}` (MAE trained with "
            + (f"{target}'s" if target else "CL-MAE's") + " training FLOPs)",
            f"Same notation. Costs still relative to `{reference}`: an arm cheaper than `{against}` that is not below "
            "it is at least as good a use of compute.",
            difference_table(results, against, reference),
            "\n".join(distinguishable(results, against)),
        ]
    masks = masks_table(results)
    if masks:
        parts += [
            "## Masks during pretraining",
            "The probe's fixed training images, measured with the arm's own MAE as it trains (so a strategy's masks "
            "are judged by an MAE that has trained on masks like them), each run's probe records averaged per third "
            "of the run. Below 1: the masks are easier than random ones (or than another image's mask, which keeps "
            "the mask distribution and asks whether a mask fits its own image).",
            masks,
        ]
    text = "\n\n".join(p for p in parts if p) + "\n"
    (out / "results.md").write_text(text)
    return text


def plot_curves(results: dict[str, Any], out: Path) -> Path:
    """λ, mask difficulty and held-out k-NN accuracy over training, one colour per arm, one line style per seed.

    The k-NN panel's x axis is training compute in units of the reference arm's whole run (FLOPs), so the
    equal-compute arm and the masking arms can be read off at the same compute.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    reference = results.get("reference_arm", "mae")
    ref_flops = flops_per_image(results, reference)
    ref_images = [run["timing"]["images"] for run in results["arms"].get(reference, {}).values()]
    fig, (ax_l, ax_d, ax_k) = plt.subplots(1, 3, figsize=(16, 4.2))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    styles = ["-", "--", ":", "-."]
    by_compute = bool(ref_flops and ref_images)
    for i, (arm, seeds) in enumerate(results["arms"].items()):
        colour = colours[i % len(colours)]
        per_image = flops_per_image(results, arm)
        batch = ((results.get("plan") or {}).get(arm, {}).get("overrides") or {}).get(
            "batch_size", results.get("pretrain", {}).get("batch_size", 1))
        for j, info in enumerate(seeds.values()):
            curves = info["curves"]
            style = {"color": colour, "ls": styles[j % len(styles)], "label": arm if j == 0 else None}
            probe = curves["probe"]
            if probe:
                steps = [r["step"] for r in probe]
                ax_l.plot(steps, [r.get("curriculum_factor", float("nan")) for r in probe], **style)
                ax_d.plot(steps, [r["mask_difficulty"] for r in probe], **style)
            if curves["knn"]:
                if by_compute and per_image:
                    x = [r["step"] * batch * per_image / (ref_flops * statistics.fmean(ref_images))
                         for r in curves["knn"]]
                else:
                    x = [r["epoch"] + 1 for r in curves["knn"]]
                ax_k.plot(x, [r["knn_top1"] for r in curves["knn"]], marker="o", ms=3, **style)
    ax_d.axhline(1.0, color="grey", lw=0.8, ls=":")
    ax_l.set(title="curriculum factor λ (masking-module arms)", xlabel="iteration", ylabel="λ")
    ax_d.set(title="mask difficulty, own MAE: loss learned / random masks", xlabel="iteration", ylabel="ratio")
    xlabel = f"training FLOPs (× one {reference} run)" if by_compute else "epoch"
    ax_k.set(title="held-out k-NN top-1 during pretraining", xlabel=xlabel, ylabel="accuracy (%)")
    for ax in (ax_l, ax_d, ax_k):
        ax.grid(alpha=0.3)
    ax_k.legend(fontsize=8, title="line style: seed", title_fontsize=7)
    fig.tight_layout()
    path = out / "curves.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
