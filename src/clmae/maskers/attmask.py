"""AttMask (Kakogeorgiou et al., "What to Hide from Your Students: Attention-Guided Masked Image Modeling",
ECCV 2022), adapted to the MAE.

A teacher, an EMA copy of the encoder, reads the whole image; the attention of its CLS token in the
last block (softmax over all keys, the CLS column dropped without renormalising, mean over heads)
says which patches matter most. The paper's "high" strategy hides the most attended patches; its
random share applies it to only part of the images (``--attmask-prob`` 0.5). The teacher's momentum
follows the paper's cosine schedule from 0.996 to 1 over the run.

Adapted to the MAE (see docs/masking-strategies.md): images outside the share get MAE's random
masks instead of none, and the mask ratio is the MAE's fixed one instead of iBOT's random ratio.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .base import Masker, MaskingBatch
from .ema import cosine_momentum, ema_update, encoder_copy
from .indices import topk_keep_indices
from .options import AttmaskOptions


@torch.no_grad()
def cls_attention(encoder: nn.Module, imgs: torch.Tensor, per_head: bool = False) -> torch.Tensor:
    """The CLS token's attention over the patches in the encoder's last block, mean over heads: ``(N, L)``, fp32
    (``per_head``: each head's, ``(N, H, L)``, what AutoMAE's mask generator reads).

    ``encoder``: a :class:`~clmae.models.mae.MaskedAutoencoderViT` (or a copy of its encoder). The last
    block's query/key projection and softmax run in fp32, outside autocast, so bf16 rounding cannot
    create ties in the ranking; only the CLS query is computed.
    """
    tokens = encoder.embed(imgs)
    cls = (encoder.cls_token + encoder.pos_embed[:, :1]).expand(tokens.shape[0], -1, -1)
    x = torch.cat([cls.to(tokens.dtype), tokens], dim=1)
    for blk in encoder.blocks[:-1]:
        x = blk(x)
    last = encoder.blocks[-1]
    attn = last.attn
    with torch.autocast(x.device.type, enabled=False):
        h = last.norm1(x.float())
        n, length, dim = h.shape
        qkv = F.linear(h, attn.qkv.weight.float(), None if attn.qkv.bias is None else attn.qkv.bias.float())
        qkv = qkv.reshape(n, length, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
        q, k = attn.q_norm(qkv[0][:, :, :1]), attn.k_norm(qkv[1])  # CLS query; all keys
        weights = torch.softmax((q * attn.scale) @ k.transpose(-2, -1), dim=-1)  # (N, H, 1, 1 + L)
    weights = weights[:, :, 0, 1:]
    return weights if per_head else weights.mean(dim=1)


class AttentionMasker(Masker):
    """AttMask-High for the MAE: a share of the images hide their most attended patches, the rest random ones.

    Options (the paper's defaults): ``prob`` 0.5 (``--attmask-prob``), the teacher's momentum 0.996
    rising to 1 on a cosine (``--attmask-momentum``), ``variant`` high (``--attmask-variant low``
    hides the least attended patches instead).
    """

    mask_label = "AttMask mask"
    score_label = "CLS attention"

    def __init__(self, epochs: int = 100, options: AttmaskOptions | None = None):
        super().__init__()
        o = (options or AttmaskOptions()).validate()
        self.epochs, self.prob, self.momentum, self.variant = epochs, o.prob, o.momentum, o.variant

    def attach(self, mae: nn.Module) -> None:
        self.teacher = encoder_copy(mae)

    def momentum_at(self, progress: float) -> float:
        """``1 − (1 − m0)(1 + cos(π·t/T))/2``: the paper's per-iteration cosine from ``m0`` to 1."""
        return cosine_momentum(self.momentum, progress, self.epochs)

    def schedule(self, progress: float) -> dict[str, float]:
        return {"attmask_momentum": self.momentum_at(progress)}

    def scores(self, batch: MaskingBatch) -> torch.Tensor:
        return cls_attention(self.teacher, batch.imgs)

    def keep_indices(self, batch: MaskingBatch) -> torch.Tensor:
        guided = batch.global_rand() < self.prob  # (N,) which images get the attention mask
        noise = batch.global_rand(batch.num_patches)
        attention = cls_attention(self.teacher, batch.imgs)
        # "high" hides the most attended patches, i.e. keeps the K least attended; "low" the reverse.
        keep_attention = topk_keep_indices(-attention if self.variant == "high" else attention, batch.num_keep)
        keep_random = topk_keep_indices(noise, batch.num_keep)
        return torch.where(guided.unsqueeze(1), keep_attention, keep_random)

    def after_optimizer_step(self, batch: MaskingBatch) -> None:
        ema_update(self.teacher, batch.mae, self.momentum_at(batch.progress))
