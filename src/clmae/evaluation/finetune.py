"""Full fine-tuning of a pretrained encoder with a linear classification head.

The recipe follows MAE's fine-tuning, scaled down: AdamW on all encoder weights with layer-wise
learning-rate decay (block ``i`` of ``depth`` gets ``layer_decay^(depth - i)`` of the head's lr, the
patch embedding and CLS token ``layer_decay^(depth + 1)``), stochastic depth rising linearly to
``drop_path`` over the blocks, label smoothing, linear warmup then cosine decay, and
random-resized-crop + horizontal flip as augmentation (no mixup, cutmix or RandAugment). The
accuracy reported is the last epoch's on the test split: nothing is selected on test.

The classifier wraps a copy of the autoencoder without its decoder, so it runs the very same
``forward_features`` as the frozen-feature protocols; drop path is added by replacing the timm
blocks' ``drop_path1/2`` modules, which leaves the model code untouched.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..data.augment import random_resized_crop_flip
from ..data.datasets import InMemoryImages
from ..data.images import normalize, train_transform
from ..data.loader import make_loader
from ..errors import ConfigError
from ..optim import lr_at
from ..runtime import autocast
from .options import FinetuneConfig, show_progress  # the configuration, torch-free there
from .protocols import topk_accuracy
from .splits import eval_batches

DECODER_PARTS = ("decoder_embed", "mask_token", "decoder_blocks", "decoder_norm", "decoder_pred")


class ViTClassifier(nn.Module):
    """The encoder of a :class:`~clmae.models.mae.MaskedAutoencoderViT` (copied, decoder removed) plus a head."""

    def __init__(self, mae: nn.Module, num_classes: int, pool: str = "cls", drop_path: float = 0.0):
        super().__init__()
        from timm.layers import DropPath

        encoder = copy.deepcopy(mae)
        for name in DECODER_PARTS:
            if hasattr(encoder, name):
                delattr(encoder, name)
        depth = len(encoder.blocks)
        for i, blk in enumerate(encoder.blocks):
            rate = drop_path * i / max(depth - 1, 1)
            blk.drop_path1 = DropPath(rate) if rate > 0 else nn.Identity()
            blk.drop_path2 = DropPath(rate) if rate > 0 else nn.Identity()
        self.encoder = encoder
        self.pool = pool
        self.depth = depth
        self.head = nn.Linear(encoder.config.embed_dim, num_classes)
        nn.init.trunc_normal_(self.head.weight, std=2e-5)  # MAE: start from (almost) uniform predictions
        nn.init.zeros_(self.head.bias)

    def forward(self, imgs: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder.forward_features(imgs, pool=self.pool))


def layer_id(name: str, depth: int) -> int:
    """0 for the embedding and CLS token, ``i + 1`` for block ``i``, ``depth + 1`` for the final norm and head."""
    if name.startswith(("encoder.cls_token", "encoder.patch_embed", "encoder.pos_embed")):
        return 0
    if name.startswith("encoder.blocks."):
        return int(name.split(".")[2]) + 1
    return depth + 1


def layer_decay_groups(model: ViTClassifier, weight_decay: float, layer_decay: float) -> list[dict]:
    """AdamW parameter groups with an ``lr_scale`` per layer; no weight decay on biases, norms, tokens."""
    groups: dict[tuple[int, bool], dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        no_decay = p.ndim <= 1 or name.endswith(".bias") or "cls_token" in name
        lid = layer_id(name, model.depth)
        key = (lid, no_decay)
        if key not in groups:
            groups[key] = {"params": [], "weight_decay": 0.0 if no_decay else weight_decay,
                           "lr_scale": layer_decay ** (model.depth + 1 - lid), "layer": lid}
        groups[key]["params"].append(p)
    return [groups[k] for k in sorted(groups)]


class LabeledBatches:
    """Augmented, normalised ``(x, y)`` training batches of a :class:`~clmae.evaluation.runner.LabeledSplit`."""

    def __init__(self, split, img_size: int, mean, std, device: torch.device, config: FinetuneConfig, seed: int,
                 num_workers: int = 2):
        self.split, self.img_size, self.mean, self.std = split, img_size, mean, std
        self.device, self.config, self.num_workers = device, config, num_workers
        self.batch_size = min(config.batch_size, len(split))
        self.generator = torch.Generator().manual_seed(seed)
        self.in_memory = isinstance(split.dataset, InMemoryImages)
        if self.in_memory:
            self.images = split.dataset.images.index_select(0, split.indices).to(device)
            self.labels = split.labels.to(device)

    def __len__(self) -> int:
        return max(1, len(self.split) // self.batch_size)

    def epoch(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        c = self.config
        if self.in_memory:
            order = torch.randperm(len(self.split), generator=self.generator).to(self.device)
            for step in range(len(self)):
                idx = order[step * self.batch_size : (step + 1) * self.batch_size]
                x = random_resized_crop_flip(self.images.index_select(0, idx), self.img_size, self.generator,
                                             scale=(c.crop_scale, 1.0), flip=c.flip)
                yield normalize(x, self.mean, self.std), self.labels.index_select(0, idx)
            return
        files = copy.copy(self.split.dataset.files)
        files.transform = train_transform(self.img_size, (c.crop_scale, 1.0), c.flip)
        seed = int(torch.randint(0, 2**31 - 1, (1,), generator=self.generator))
        loader = make_loader(torch.utils.data.Subset(files, self.split.indices.tolist()), self.batch_size, self.device,
                             self.num_workers, shuffle=True, drop_last=True, seed=seed)
        for images, labels, _ in loader:
            if images is None or images.shape[0] < 2:
                continue
            x = images.to(self.device, non_blocking=True).float().div_(255.0)
            yield normalize(x, self.mean, self.std), labels.to(self.device)


@torch.no_grad()
def classify(model: nn.Module, setup, split) -> torch.Tensor:
    """Logits ``(N, C)`` (CPU, float32) for the evaluation view of ``split``."""
    model.eval()
    out, labels = [], []
    o = setup.options
    batches = eval_batches(split, setup.img_size, setup.mean, setup.std, setup.device, o.extract_batch_size,
                           o.num_workers)
    for x, y in batches:
        with autocast(setup.device):
            out.append(model(x).float().cpu())
        labels.append(y.cpu())
    return torch.cat(out), torch.cat(labels)


def finetune_metrics(setup, encoder, config: FinetuneConfig | None = None) -> tuple[dict, dict]:
    """Fine-tune a copy of ``encoder.model`` on ``setup.train``; top-1/top-5 on ``setup.test``."""
    from tqdm.auto import tqdm

    c = (config or FinetuneConfig()).validate()
    o = setup.options
    device = setup.device
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(o.seed)
        model = ViTClassifier(encoder.model, setup.num_classes, o.pool, c.drop_path).to(device)
    logits, labels = classify(model, setup, setup.test)
    before = topk_accuracy(logits, labels, "before")["before_top1"]

    batches = LabeledBatches(setup.train, setup.img_size, setup.mean, setup.std, device, c, o.seed, o.num_workers)
    opt = torch.optim.AdamW(layer_decay_groups(model, c.weight_decay, c.layer_decay), lr=c.absolute_lr(),
                            betas=(0.9, 0.999))
    steps_per_epoch = len(batches)
    bar = tqdm(total=c.epochs * steps_per_epoch, desc=f"finetune {encoder.role}", unit="it",
               disable=not show_progress(o.progress), leave=False, dynamic_ncols=True)
    start, seen, losses = time.perf_counter(), 0, []
    with torch.random.fork_rng(devices=[device.index or 0] if device.type == "cuda" else []):
        torch.manual_seed(o.seed)  # drop-path masks
        for epoch in range(c.epochs):
            model.train()
            losses = []
            for step, (x, y) in enumerate(batches.epoch()):
                lr = lr_at(epoch + step / steps_per_epoch, c.absolute_lr(), c.min_lr, c.warmup_epochs, c.epochs)
                for group in opt.param_groups:
                    group["lr"] = lr * group["lr_scale"]
                with autocast(device):
                    loss = F.cross_entropy(model(x).float(), y, label_smoothing=c.label_smoothing)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                value = loss.item()
                if not math.isfinite(value):
                    raise ConfigError(f"--lr: fine-tuning diverged (loss {value}) at epoch {epoch}; lower --base-lr")
                losses.append(value)
                seen += x.shape[0]
                bar.update(1)
                bar.set_postfix(loss=f"{value:.3f}", refresh=False)
    bar.close()
    seconds = time.perf_counter() - start
    logits, labels = classify(model, setup, setup.test)
    metrics = topk_accuracy(logits, labels, "finetune")
    details = {"before_top1": before, "final_train_loss": sum(losses) / max(len(losses), 1),
               "lr": c.absolute_lr(), "steps": c.epochs * steps_per_epoch, "train_seconds": round(seconds, 2),
               "train_img_per_s": round(seen / max(seconds, 1e-9), 1)}
    return metrics, details
