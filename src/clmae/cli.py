"""The ``clmae`` command line. Each sub-command is a thin layer over the Python API.

Errors a user can fix (:class:`clmae.errors.ClmaeError`) print one line and exit with code 2.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from .config import CHOICES, FIELDS, load_config_file, make_config, preset_names
from .errors import ClmaeError
from .options import flag, help_of
from .version import __version__


def _add_pretrain(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("pretrain", help="pretrain a ViT with CL-MAE or MAE",
                       description="Pretrain a ViT with CL-MAE (default) or MAE. With no arguments: CL-MAE on the "
                                   "built-in digits set, a few minutes on a CPU.")
    p.add_argument("--config", metavar="FILE_OR_PRESET",
                   help=f"YAML file of options, or a shipped preset ({', '.join(preset_names())}); flags override it")
    for name, f in FIELDS.items():
        if name == "extra":
            continue
        kind = str(f.type)
        kwargs = {"help": help_of(f), "default": argparse.SUPPRESS, "dest": name}
        if name == "resume":
            p.add_argument(flag(name), nargs="?", const="auto", metavar="RUN", **kwargs)
        elif kind.startswith("bool"):
            p.add_argument(flag(name), action=argparse.BooleanOptionalAction, **kwargs)
        else:
            typ = float if kind.startswith("float") else int if kind.startswith("int") else str
            p.add_argument(flag(name), type=typ, choices=CHOICES.get(name), **kwargs)
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
        print(f"clmae: {cfg.method} on {trainer.dataset.name} ({len(trainer.dataset)} images), "
              f"model {trainer.model_name}, "
              f"{trainer.model_config.num_patches} patches, device {trainer.device}, output {trainer.output_dir}",
              file=sys.stderr)
    result = trainer.fit()
    if main_process:
        print(result.summary())
    return 0


def _add_models(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("models", help="list the named model configurations")
    p.set_defaults(func=_run_models)


def _add_methods(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("methods", help="list the masking strategies (--method)")
    p.set_defaults(func=_run_methods)


def _run_methods(args: argparse.Namespace) -> int:
    from .maskers import METHODS

    for name, method in METHODS.items():
        print(f"{name:<10} {method.summary}")
    return 0


def _run_models(args: argparse.Namespace) -> int:
    from .model import MODEL_CONFIGS

    print(f"{'name':<24} {'img':>4} {'patch':>5} {'width':>5} {'depth':>5} {'heads':>5}  decoder (w/d/h)")
    for name, c in sorted(MODEL_CONFIGS.items()):
        print(f"{name:<24} {c.img_size:>4} {c.patch_size:>5} {c.embed_dim:>5} {c.depth:>5} {c.num_heads:>5}  "
              f"{c.decoder_embed_dim}/{c.decoder_depth}/{c.decoder_num_heads}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    # Sub-commands living next to the code they drive: each module has ``add_cli(subparsers)``.
    from . import compare, eval_cli, export, report, visualize

    parser = argparse.ArgumentParser(prog="clmae", description="Curriculum-Learned Masked Autoencoders for ViTs")
    parser.add_argument("--version", action="version", version=f"clmae {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_pretrain(sub)
    _add_models(sub)
    _add_methods(sub)
    for module in (eval_cli, compare, visualize, report, export):
        module.add_cli(sub)
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
