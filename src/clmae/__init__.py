"""clmae: Curriculum-Learned Masked Autoencoders (CL-MAE) for Vision Transformers.

The Python API mirrors the CLI: ``pretrain`` (``clmae pretrain``), ``evaluate`` (``clmae eval``),
``load_pretrained`` to get the trained model back, ``create_model`` / ``create_masker`` for the parts.
"""

__version__ = "0.1.0"

from .checkpoint import load_pretrained  # noqa: E402
from .config import PretrainConfig  # noqa: E402
from .evaluation import evaluate  # noqa: E402
from .maskers import create_masker  # noqa: E402
from .model import create_model, list_models  # noqa: E402
from .trainer import Trainer, pretrain  # noqa: E402

__all__ = ["PretrainConfig", "Trainer", "pretrain", "evaluate", "load_pretrained", "create_model", "create_masker",
           "list_models", "__version__"]
