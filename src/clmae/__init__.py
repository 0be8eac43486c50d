"""clmae: Curriculum-Learned Masked Autoencoders (CL-MAE) for Vision Transformers.

The Python API mirrors the CLI: ``pretrain`` (``clmae pretrain``), ``evaluate`` / ``evaluate_all``
(``clmae eval PROTOCOL`` / ``clmae eval all``, options as keywords, see ``EvalOptions``),
``load_pretrained`` to get the trained model back, ``create_model`` / ``create_masker`` for the parts.

Every ``import clmae.x`` runs this file first, so it imports nothing heavy: each name of the API
is imported from its module when first used (PEP 562), and ``clmae --help`` never waits for torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .lazy import lazy_attributes
from .version import __version__

if TYPE_CHECKING:
    from .checkpoint import load_pretrained
    from .config import PretrainConfig
    from .evaluation import evaluate, evaluate_all
    from .maskers import create_masker
    from .model import create_model, list_models
    from .tool_options import EvalOptions
    from .trainer import Trainer, pretrain

# The API's names and the module each is imported from on first use.
_API = {"load_pretrained": "checkpoint", "PretrainConfig": "config", "EvalOptions": "tool_options",
        "evaluate": "evaluation", "evaluate_all": "evaluation", "create_masker": "maskers", "create_model": "model",
        "list_models": "model", "Trainer": "trainer", "pretrain": "trainer"}


__getattr__, __dir__ = lazy_attributes(__name__, _API)


__all__ = ["PretrainConfig", "Trainer", "pretrain", "evaluate", "load_pretrained", "create_model", "create_masker",
           "list_models", "__version__", "EvalOptions", "evaluate_all"]
