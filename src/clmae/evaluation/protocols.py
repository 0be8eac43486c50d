"""Evaluation protocols on frozen features: k-NN (majority and weighted), linear probe, few-shot.

Pure functions of ``(features, labels)`` tensors, so each protocol is testable without a model or a
dataset; :mod:`clmae.evaluation.runner` extracts the features and writes the reports. The protocols
themselves are described at the top of :mod:`clmae.evaluation.runner`.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import ConfigError, DataError
from ..runtime import few_threads
from .options import FewShotConfig, KnnConfig, LinearConfig  # the configurations, torch-free there

# ---------------------------------------------------------------------------------------------
# k-NN


def centred_bank(train_feats: torch.Tensor, device: torch.device,
                 chunk: int = 65536) -> tuple[torch.Tensor, torch.Tensor]:
    """``(training features minus their mean as float32, the float64 mean)`` on ``device``.

    Distances do not change under a shift, but float32 products of large values lose their low
    digits: centring first (mean and subtraction in float64) keeps the shortcut accurate whatever
    offset the features carry.
    """
    total = torch.zeros(train_feats.shape[1], dtype=torch.float64, device=device)
    for part in train_feats.split(chunk):
        total += part.to(device, torch.float64).sum(0)
    mean = total / max(train_feats.shape[0], 1)
    return torch.cat([(part.to(device, torch.float64) - mean).float() for part in train_feats.split(chunk)]), mean


def knn_class_scores(train_feats: torch.Tensor, train_labels: torch.Tensor, test_feats: torch.Tensor,
                     num_classes: int, k: int, metric: str, temperature: float = 0.07, chunk_size: int = 1024,
                     device: torch.device | str | None = None) -> torch.Tensor:
    """Per-class vote scores ``(N_test, C)`` (on the CPU) of a k-NN classifier.

    ``metric="euclidean"``: majority vote, each of the ``k`` nearest counts 1; ties between classes are
    broken in favour of the class whose best neighbour ranks highest (a bonus below 1 that never
    outweighs a vote). Neighbours: candidates from one matrix product on features centred on the
    training mean, ``‖q − t‖² = ‖q‖² − (2 q·t − ‖t‖²)``, then the exact distances of those
    candidates (float64) decide the order, so a constant offset of the features changes nothing.
    ``metric="cosine"``: votes weighted by ``exp(similarity / temperature)``.
    The test set is processed in chunks of ``chunk_size`` rows as one matrix product each.
    """
    if metric not in ("euclidean", "cosine"):
        raise ConfigError(f"metric: must be 'euclidean' or 'cosine', got {metric!r}")
    device = torch.device(device) if device is not None else train_feats.device
    n_train = train_feats.shape[0]
    k = min(k, n_train)
    bank_labels = train_labels.to(device)
    if metric == "cosine":
        bank = F.normalize(train_feats.to(device, torch.float32), dim=1)
    else:
        centred, mean = centred_bank(train_feats, device)
        # −‖q − t‖² + ‖q‖² = 2 q·t − ‖t‖² = [q, 1] · [2t, −‖t‖²]: one matrix product finds the candidates.
        bank = torch.cat([2 * centred, -(centred * centred).sum(1, keepdim=True)], dim=1)
        del centred
        raw = train_feats.to(device, torch.float32)  # differences of float32 values are exact in float64
        candidates = min(n_train, 2 * k + 16)  # a margin for the shortcut's rounding near the k-th neighbour
    ranks = torch.arange(k, device=device, dtype=torch.float32)
    tie_bonus = (k - ranks) / (k + 1)  # rank 0 → k/(k+1) < 1
    out = []
    for chunk in test_feats.split(chunk_size):
        if metric == "cosine":
            q = chunk.to(device, torch.float32)
            sim = F.normalize(q, dim=1) @ bank.T
            values, idx = sim.topk(k, dim=1)
            weights = torch.exp(values / temperature)
        else:
            q = (chunk.to(device, torch.float64) - mean).float()
            closeness = torch.cat([q, torch.ones(q.shape[0], 1, device=device)], dim=1) @ bank.T
            _, cand = closeness.topk(candidates, dim=1, sorted=True)
            diff = chunk.to(device, torch.float64).unsqueeze(1) - raw[cand].double()
            order = (diff * diff).sum(-1).argsort(dim=1, stable=True)[:, :k]  # exact ties keep topk's order
            idx = cand.gather(1, order)
            weights = torch.ones_like(idx, dtype=torch.float32)
        neighbour_labels = bank_labels[idx]
        scores = torch.zeros(q.shape[0], num_classes, device=device).scatter_add_(1, neighbour_labels, weights)
        if metric == "euclidean":
            bonus = torch.zeros_like(scores).scatter_reduce_(
                1, neighbour_labels, tie_bonus.expand_as(weights).contiguous(), reduce="amax", include_self=True
            )
            scores += bonus
        out.append(scores.cpu())
    return torch.cat(out)


def topk_accuracy(scores: torch.Tensor, labels: torch.Tensor, prefix: str) -> dict[str, float]:
    """``{prefix_top1: %, prefix_top5: %}``; top-5 only with more than 5 classes (else it is trivially 100)."""
    labels = labels.to(scores.device)
    result = {f"{prefix}_top1": 100.0 * float((scores.argmax(1) == labels).float().mean())}
    if scores.shape[1] > 5:
        top5 = scores.topk(5, dim=1).indices
        result[f"{prefix}_top5"] = 100.0 * float((top5 == labels.unsqueeze(1)).any(1).float().mean())
    return result


def knn_metrics(train_feats, train_labels, test_feats, test_labels, num_classes: int, config: KnnConfig | None = None,
                device=None) -> dict[str, float]:
    """Both k-NN protocols: ``knn_majority_top1/5`` (k=5, Euclidean) and ``knn_weighted_top1/5`` (k=20, cosine)."""
    c = (config or KnnConfig()).validate()
    result = {}
    scores = knn_class_scores(train_feats, train_labels, test_feats, num_classes, c.k_majority, "euclidean",
                              chunk_size=c.chunk_size, device=device)
    result.update(topk_accuracy(scores, test_labels, "knn_majority"))
    scores = knn_class_scores(train_feats, train_labels, test_feats, num_classes, c.k_weighted, "cosine",
                              c.temperature, c.chunk_size, device)
    result.update(topk_accuracy(scores, test_labels, "knn_weighted"))
    return result


# ---------------------------------------------------------------------------------------------
# Linear classifiers on frozen features


class LinearHead(nn.Sequential):
    """``BatchNorm1d(affine=False)`` then ``Linear``: MAE's probe head, scale-free in the features.

    The batch norm keeps a cumulative average (``momentum=None``), so at test time it uses the mean
    statistics of all training batches.
    """

    def __init__(self, dim: int, num_classes: int):
        super().__init__(nn.BatchNorm1d(dim, affine=False, eps=1e-6, momentum=None), nn.Linear(dim, num_classes))
        nn.init.trunc_normal_(self[1].weight, std=0.01)
        nn.init.zeros_(self[1].bias)


def train_linear(feats: torch.Tensor, labels: torch.Tensor, num_classes: int, lr: float, steps: int,
                 batch_size: int, weight_decay: float, seed: int, device=None) -> LinearHead:
    """Fit a :class:`LinearHead` with AdamW and a cosine schedule over ``steps`` mini-batches.

    Batches walk through seeded permutations of the data; a trailing batch of one sample is skipped
    (batch norm needs two). With ``batch_size >= len(feats)`` every step is full-batch.
    """
    return train_linear_heads(feats, labels, num_classes, (lr,), steps, batch_size, weight_decay, seed, device)[0]


def train_linear_heads(feats: torch.Tensor, labels: torch.Tensor, num_classes: int, lrs, steps: int,
                       batch_size: int, weight_decay: float, seed: int, device=None) -> list[LinearHead]:
    """One :class:`LinearHead` per learning rate in ``lrs``, each as :func:`train_linear` trains it alone.

    The heads see the same batches side by side: they share no parameter (one batch norm without
    parameters feeds them all) and AdamW updates each parameter on its own, so one step of the sum
    of their losses is one step of each; a learning-rate sweep then costs one pass, not one per rate.
    """
    device = torch.device(device) if device is not None else feats.device
    n = feats.shape[0]
    if n < 2:
        raise DataError(f"need at least 2 training samples for a linear classifier, got {n}")
    heads = []
    for _ in lrs:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            heads.append(LinearHead(feats.shape[1], num_classes).to(device))
    for head in heads[1:]:
        head[0] = heads[0][0]  # one batch norm: the same statistics for every head
    x_all, y_all = feats.to(device, torch.float32), labels.to(device)
    opt = torch.optim.AdamW([{"params": list(h[1].parameters()), "lr": lr, "peak_lr": lr} for h, lr in zip(heads, lrs)],
                            weight_decay=weight_decay)
    g = torch.Generator().manual_seed(seed)
    batch_size = min(batch_size, n)
    for head in heads:
        head.train()
    with few_threads(device):
        _fit(heads, opt, x_all, y_all, steps, batch_size, g)
    return [head.eval() for head in heads]


def _fit(heads: list[LinearHead], opt, x_all, y_all, steps: int, batch_size: int, g: torch.Generator) -> None:
    n, step = x_all.shape[0], 0
    norm = heads[0][0]
    while step < steps:
        order = torch.randperm(n, generator=g).to(x_all.device)
        for start in range(0, n, batch_size):
            idx = order[start : start + batch_size]
            if idx.numel() < 2:
                continue
            for group in opt.param_groups:
                group["lr"] = 0.5 * group["peak_lr"] * (1.0 + math.cos(math.pi * step / steps))
            z, y = norm(x_all[idx]), y_all[idx]
            loss = sum(F.cross_entropy(head[1](z), y) for head in heads)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            if step >= steps:
                break


@torch.no_grad()
def classifier_scores(head: nn.Module, feats: torch.Tensor, device=None, chunk: int = 8192) -> torch.Tensor:
    device = torch.device(device) if device is not None else next(head.parameters()).device
    return torch.cat([head(f.to(device, torch.float32)).float().cpu() for f in feats.split(chunk)])


def split_train_val(n: int, val_fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded random ``(train_idx, val_idx)`` of ``range(n)``; validation gets at least one item."""
    n_val = min(max(1, int(round(n * val_fraction))), n - 2)
    if n_val < 1:
        raise DataError(f"need at least 3 training samples to carve out a validation split, got {n}")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 31 + 17))
    return order[n_val:], order[:n_val]


def linear_probe_metrics(train_feats, train_labels, test_feats, test_labels, num_classes: int,
                         config: LinearConfig | None = None, seed: int = 0, device=None) -> tuple[dict, dict]:
    """Linear probe: choose the lr on a validation split of train, retrain on all of train, score test.

    Returns ``(metrics, details)``; details hold the validation accuracy of every lr tried.
    """
    c = (config or LinearConfig()).validate()
    n = train_feats.shape[0]
    tr, va = split_train_val(n, c.val_fraction, seed)
    sweep = {}
    heads = train_linear_heads(train_feats[tr], train_labels[tr], num_classes, c.lrs, c.steps(len(tr)), c.batch_size,
                               c.weight_decay, seed, device)
    for lr, head in zip(c.lrs, heads):
        sweep[repr(lr)] = topk_accuracy(classifier_scores(head, train_feats[va]), train_labels[va], "val")["val_top1"]
    best_lr = max(c.lrs, key=lambda lr: (sweep[repr(lr)], -lr))  # ties → the smaller lr
    head = train_linear(train_feats, train_labels, num_classes, best_lr, c.steps(n), c.batch_size, c.weight_decay,
                        seed, device)
    metrics = topk_accuracy(classifier_scores(head, test_feats), test_labels, "linear")
    details = {"val_top1_by_lr": sweep, "best_lr": best_lr, "train_size": len(tr), "val_size": len(va),
               "steps": c.steps(n), "sweep_steps": c.steps(len(tr))}
    return metrics, details


def sample_support(labels: torch.Tensor, shots: int, generator: torch.Generator) -> torch.Tensor:
    """Indices of exactly ``shots`` random samples of every class present in ``labels``.

    Raises :class:`ConfigError` when a class has fewer than ``shots`` samples.
    """
    classes, counts = labels.unique(return_counts=True)
    smallest = int(counts.min())
    if shots > smallest:
        worst = int(classes[counts.argmin()])
        raise ConfigError(
            f"--shots: {shots}-shot needs {shots} training images per class, but class {worst} has only {smallest}; "
            f"use shots <= {smallest}"
        )
    picked = []
    for c in classes.tolist():
        members = (labels == c).nonzero().squeeze(1)
        picked.append(members[torch.randperm(members.numel(), generator=generator)[:shots]])
    return torch.cat(picked)


def fewshot_metrics(train_feats, train_labels, test_feats, test_labels, num_classes: int,
                    config: FewShotConfig | None = None, seed: int = 0, device=None) -> tuple[dict, dict]:
    """n-shot linear classifiers, ``draws`` support sets per n; mean and std of top-1 over the draws."""
    c = (config or FewShotConfig()).validate()
    for shots in c.shots:  # fail before any training
        sample_support(train_labels, shots, torch.Generator().manual_seed(0))
    metrics, per_draw = {}, {}
    for shots in c.shots:
        accs = []
        for draw in range(c.draws):
            g = torch.Generator().manual_seed(seed * 1_000_003 + shots * 1009 + draw)
            idx = sample_support(train_labels, shots, g)
            head = train_linear(train_feats[idx], train_labels[idx], num_classes, c.lr, c.steps, len(idx),
                                c.weight_decay, seed + draw, device)
            accs.append(topk_accuracy(classifier_scores(head, test_feats), test_labels, "a")["a_top1"])
        t = torch.tensor(accs, dtype=torch.float64)
        metrics[f"fewshot_{shots}shot_top1"] = float(t.mean())
        metrics[f"fewshot_{shots}shot_top1_std"] = float(t.std(unbiased=False))
        per_draw[f"{shots}shot"] = accs
    return metrics, {"top1_per_draw": per_draw}
