"""clmae: Curriculum-Learned Masked Autoencoders (CL-MAE) for Vision Transformers.

The Python API mirrors the CLI: ``pretrain`` (``clmae pretrain``), ``evaluate`` / ``evaluate_all``
(``clmae eval PROTOCOL`` / ``clmae eval all``, options as keywords, see ``EvalOptions``),
``load_pretrained`` to get the trained model back, ``create_model`` / ``create_masker`` for the parts.
"""

from .checkpoint import load_pretrained
from .config import PretrainConfig
from .evaluation import EvalOptions, evaluate, evaluate_all
from .maskers import create_masker
from .model import create_model, list_models
from .trainer import Trainer, pretrain
from .version import __version__

__all__ = ["PretrainConfig", "Trainer", "pretrain", "evaluate", "load_pretrained", "create_model", "create_masker",
           "list_models", "__version__", "EvalOptions", "evaluate_all"]
