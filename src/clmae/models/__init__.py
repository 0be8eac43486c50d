"""The network: the masked autoencoder, its named configurations and its building blocks.

* :mod:`clmae.models.configs` — :class:`ModelConfig`, the registry :data:`MODEL_CONFIGS` (``clmae
  models``), the rule that picks a model for the data (:func:`resolve_model`); plain Python, no torch.
* :mod:`clmae.models.layers` — position embeddings, patches, initialisation, timm ViT blocks.
* :mod:`clmae.models.mae` — :class:`MaskedAutoencoderViT` and the MAE loss.

The names below are imported on first use (PEP 562), so ``from clmae.models import model_config``
stays torch-free.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..lazy import lazy_attributes

if TYPE_CHECKING:
    from .configs import MODEL_CONFIGS, ModelConfig, default_model, list_models, model_config, resolve_model
    from .layers import patchify, per_patch_target, unpatchify
    from .mae import MaskedAutoencoderViT, create_model, per_patch_error, reconstruction_loss

_NAMES = {"MODEL_CONFIGS": "configs", "ModelConfig": "configs", "default_model": "configs",
          "list_models": "configs", "model_config": "configs", "resolve_model": "configs",
          "patchify": "layers", "per_patch_target": "layers", "unpatchify": "layers",
          "MaskedAutoencoderViT": "mae", "create_model": "mae", "per_patch_error": "mae",
          "reconstruction_loss": "mae"}

__getattr__, __dir__ = lazy_attributes(__name__, _NAMES)

__all__ = ["MODEL_CONFIGS", "MaskedAutoencoderViT", "ModelConfig", "create_model", "default_model", "list_models",
           "model_config", "patchify", "per_patch_error", "per_patch_target", "reconstruction_loss", "resolve_model",
           "unpatchify"]
