"""clmae: Curriculum-Learned Masked Autoencoders (CL-MAE) for Vision Transformers.

The Python API mirrors the CLI: ``pretrain`` (``clmae pretrain``), ``evaluate`` / ``evaluate_all``
(``clmae eval PROTOCOL`` / ``clmae eval all``, options as keywords, see ``EvalOptions``), ``report``
(``clmae report``), ``visualize`` (``clmae visualize``), ``export`` (``clmae export``), ``compare``
(``clmae compare``), ``load_pretrained`` to get the trained model back, ``create_model`` /
``create_masker`` for the parts.

Every ``import clmae.x`` runs this file first, so it imports nothing heavy: each name of the API
is imported from its module when first used (PEP 562), and ``clmae --help`` never waits for torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .lazy import lazy_attributes
from .version import __version__

if TYPE_CHECKING:
    from .config import PretrainConfig
    from .evaluation.compare import compare
    from .evaluation.options import EvalOptions
    from .evaluation.runner import evaluate, evaluate_all
    from .io.checkpoint import load_pretrained
    from .io.export import export_encoder as export
    from .maskers import create_masker
    from .models.configs import list_models
    from .models.mae import create_model
    from .train.trainer import Trainer, pretrain
    from .viz.report import build_report as report
    from .viz.visualize import visualize_checkpoint as visualize

# The API's names and the module each is imported from on first use.
_API = {"load_pretrained": "io.checkpoint", "PretrainConfig": "config", "EvalOptions": "evaluation.options",
        "evaluate": "evaluation.runner", "evaluate_all": "evaluation.runner", "create_masker": "maskers",
        "create_model": "models.mae", "list_models": "models.configs", "Trainer": "train.trainer",
        "pretrain": "train.trainer", "report": "viz.report:build_report",
        "visualize": "viz.visualize:visualize_checkpoint", "export": "io.export:export_encoder",
        "compare": "evaluation.compare:compare"}


__getattr__, __dir__ = lazy_attributes(__name__, _API)


__all__ = ["PretrainConfig", "Trainer", "pretrain", "evaluate", "load_pretrained", "create_model", "create_masker",
           "list_models", "__version__", "EvalOptions", "evaluate_all", "report", "visualize", "export", "compare"]
