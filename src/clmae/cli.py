"""The ``clmae`` command line. Each sub-command is a thin layer over the Python API.

Errors a user can fix (:class:`clmae.errors.ClmaeError`) print one line and exit with code 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Callable, Sequence

from .config import FIELDS, load_config_file, make_config, preset_names
from .curriculum import SCHEDULES
from .errors import ClmaeError

HELP = {
    "data": "digits (built in), cifar10, a .npz with x_train/y_train, or a folder of images",
    "data_dir": "where cifar10 etc. are looked for (default: $CLMAE_DATA, then ./data)",
    "subset": "train on the first N images only",
    "img_size": "input resolution (default: the model's)",
    "num_workers": "DataLoader workers for image folders",
    "method": "clmae (learned curriculum masking) or mae (random masking)",
    "model": "named configuration, see `clmae models` (default: chosen by dataset)",
    "patch_size": "override the model's patch size",
    "norm_pix_loss": "reconstruct per-patch normalised pixels (MAE option)",
    "mask_ratio": "fraction of patches hidden from the encoder, in (0, 1)",
    "init_from": "start from an MAE checkpoint (facebookresearch/mae .pth, clmae run, or timm export)",
    "curriculum": "λ schedule: official (per epoch, +1→−1), linear (per step), constant, partner, neutral, adversary",
    "curriculum_value": "λ for --curriculum constant",
    "lambda_gauss": "weight of the binarization (Gaussian) loss",
    "lambda_kl": "weight of the mask-ratio KL loss",
    "lambda_div": "weight of the diversity loss",
    "kl_reduction": "sum (authors') or mean of the KL loss over the batch",
    "masker_every": "update the masking module every K iterations (1 = authors')",
    "masker_batch_fraction": "masking-module step on this random fraction of the batch (1 = authors')",
    "epochs": "training epochs",
    "batch_size": "images per iteration (per device)",
    "accum_iter": "gradient accumulation iterations",
    "base_lr": "lr = base_lr × effective batch / 256",
    "lr": "absolute learning rate (overrides --base-lr)",
    "min_lr": "lowest learning rate of the cosine schedule",
    "warmup_epochs": "linear warmup epochs",
    "weight_decay": "AdamW weight decay (not on biases, norms, tokens)",
    "seed": "random seed",
    "device": "auto, cpu, cuda, cuda:N or mps",
    "output_dir": "run folder (default: runs/<method>-<data>-<time>)",
    "resume": "continue a run: its folder or checkpoint (alone: the --output-dir's)",
    "save_every": "also keep checkpoint-EPOCH every N epochs",
    "log_every": "iterations between metrics.jsonl lines",
    "eval_every": "quick k-NN evaluation every N epochs (0 = off)",
    "max_nonfinite": "stop after this many non-finite steps in a row",
    "compile": "torch.compile the model and the masking module",
    "probe_every": "iterations between curriculum-probe measurements (mask_difficulty etc.; 0 = off)",
    "probe_images": "fixed training images the curriculum probe measures on",
    "snapshot_every": "save the probe images' scores and masks every N epochs (0 = off; default: about 10 per run)",
    "progress": "show a progress bar",
}
CHOICES = {"method": ["clmae", "mae"], "curriculum": list(SCHEDULES), "kl_reduction": ["sum", "mean"]}


def _add_pretrain(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("pretrain", help="pretrain a ViT with CL-MAE or MAE",
                       description="Pretrain a ViT with CL-MAE (default) or MAE. With no arguments: CL-MAE on the "
                                   "built-in digits set, a few minutes on a CPU.")
    p.add_argument("--config", metavar="FILE_OR_PRESET",
                   help=f"YAML file of options, or a shipped preset ({', '.join(preset_names())}); flags override it")
    for name, f in FIELDS.items():
        if name == "extra":
            continue
        flag = "--" + name.replace("_", "-")
        kind = str(f.type)
        kwargs = {"help": HELP.get(name, ""), "default": argparse.SUPPRESS, "dest": name}
        if name == "resume":
            p.add_argument(flag, nargs="?", const="auto", metavar="RUN", **kwargs)
        elif kind.startswith("bool"):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, **kwargs)
        else:
            typ = float if kind.startswith("float") else int if kind.startswith("int") else str
            p.add_argument(flag, type=typ, choices=CHOICES.get(name), **kwargs)
    p.set_defaults(func=_run_pretrain)


def _run_pretrain(args: argparse.Namespace) -> int:
    from .trainer import Trainer

    given = {k: v for k, v in vars(args).items() if k in FIELDS}
    values = load_config_file(args.config) if args.config else {}
    values.update(given)
    cfg = make_config(values)
    trainer = Trainer(cfg, overrides=values if cfg.resume else None)
    main_process = trainer.dist.is_main
    if main_process:
        print(f"clmae: {cfg.method} on {trainer.dataset.name} ({len(trainer.dataset)} images), model {trainer.model_name}, "
              f"{trainer.model_config.num_patches} patches, device {trainer.device}, output {trainer.output_dir}",
              file=sys.stderr)
    result = trainer.fit()
    if main_process:
        print(result.summary())
    return 0


def _add_models(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("models", help="list the named model configurations")
    p.set_defaults(func=_run_models)


def _run_models(args: argparse.Namespace) -> int:
    from .model import MODEL_CONFIGS

    print(f"{'name':<24} {'img':>4} {'patch':>5} {'width':>5} {'depth':>5} {'heads':>5}  decoder (w/d/h)")
    for name, c in sorted(MODEL_CONFIGS.items()):
        print(f"{name:<24} {c.img_size:>4} {c.patch_size:>5} {c.embed_dim:>5} {c.depth:>5} {c.num_heads:>5}  "
              f"{c.decoder_embed_dim}/{c.decoder_depth}/{c.decoder_num_heads}")
    return 0


# Sub-commands living next to the code they drive: each module has ``add_cli(subparsers)``.
COMMAND_MODULES: list[str] = ["evaluation", "compare", "visualize", "report", "export"]


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(prog="clmae", description="Curriculum-Learned Masked Autoencoders for ViTs")
    parser.add_argument("--version", action="version", version=f"clmae {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_pretrain(sub)
    _add_models(sub)
    for module in COMMAND_MODULES:
        importlib.import_module(f"clmae.{module}").add_cli(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    func: Callable[[argparse.Namespace], int] | None = getattr(args, "func", None)
    if func is None:
        parser.print_help()
        return 2
    try:
        return func(args)
    except ClmaeError as exc:
        print(f"clmae: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("clmae: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
