"""The ``clmae`` command line. Each sub-command is a thin layer over the Python API.

Errors a user can fix (:class:`clmae.errors.ClmaeError`) and usage errors print one line,
``clmae: error: ...``, and exit with code 2. A pretraining run stopped by a signal exits as a shell
reports a process killed by it, 128 + the signal's number (130 for Ctrl-C, 143 for SIGTERM), after
saving its checkpoint, so ``clmae pretrain ... && clmae eval ...`` never evaluates a half-trained run.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence

from .config import CHOICES, FIELDS, load_config_file, make_config, preset_names
from .errors import ClmaeError
from .options import flag, help_of
from .version import __version__


class ArgumentParser(argparse.ArgumentParser):
    """argparse with one-line usage errors: ``clmae: error: ...`` and where to look, exit code 2."""

    def error(self, message: str):
        self.exit(2, f"clmae: error: {message} (see `{self.prog} --help`)\n")


def _with_default(text: str, default) -> str:
    """Help text ending with the default, unless the text already says what happens by default."""
    if "default" in text or default is None:
        return text
    if isinstance(default, bool):
        default = "on" if default else "off"
    return f"{text} (default: {default})"


def _add_pretrain(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("pretrain", help="pretrain a ViT with CL-MAE or MAE",
                       description="Pretrain a ViT with CL-MAE (default) or MAE. With no arguments: CL-MAE on the "
                                   "built-in digits set, a few minutes on a CPU. Without --model, the model is "
                                   "chosen from the data's image size (see `clmae models`).")
    p.add_argument("--config", metavar="FILE_OR_PRESET",
                   help=f"YAML file of options, or a shipped preset ({', '.join(preset_names())}); flags override it")
    for name, f in FIELDS.items():
        if name == "extra":
            continue
        kind = str(f.type)
        kwargs = {"help": _with_default(help_of(f), f.default), "default": argparse.SUPPRESS, "dest": name}
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
    if trainer.dist.is_main:
        print(header_line(trainer), file=sys.stderr)
    return trainer.fit().exit_code  # the summary is printed by the run's console


def header_line(trainer) -> str:
    """What runs on what, and why this model: ``clmae: clmae on x.npz (2048 images, 28 px, gray), model …``."""
    cfg, choice, scan, mc = trainer.cfg, trainer.model_choice, trainer.data_scan, trainer.model_config
    native = f", {scan.size} px" if scan.size else ""
    colour = "gray" if trainer.dataset.channels == 1 else "RGB"
    if trainer.resume_path is not None:
        why = "as the run started"
    else:
        why = choice.reason
        if cfg.model is None:
            why += "; --model/--img-size to override"
        elif scan.size and scan.size != mc.img_size:
            why += f"; the data is {scan.size} px"
    return (f"clmae: {cfg.method} on {trainer.dataset.name} ({len(trainer.dataset)} images{native}, {colour}), "
            f"model {choice.name} at {mc.img_size} px ({why}), {mc.grid_size}x{mc.grid_size} patches of "
            f"{mc.patch_size} px, device {trainer.device}, output {trainer.output_dir}")


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
    from .model_configs import MODEL_CONFIGS, SUITS, param_count

    def suits(name: str) -> str:
        lo, hi = SUITS.get(name, (None, None))
        return "" if lo is None else (f">= {lo} px" if hi is None else f"{lo}-{hi} px")

    print(f"{'name':<22} {'img':>4} {'patch':>5} {'width':>5} {'depth':>5} {'heads':>5} {'encoder':>8} "
          f"{'total':>8}  {'suits':<11} decoder (w/d/h)")
    for name, c in sorted(MODEL_CONFIGS.items(), key=lambda kv: (kv[1].embed_dim * kv[1].depth, kv[1].img_size)):
        encoder, decoder = param_count(c)
        print(f"{name:<22} {c.img_size:>4} {c.patch_size:>5} {c.embed_dim:>5} {c.depth:>5} {c.num_heads:>5} "
              f"{encoder / 1e6:>7.1f}M {(encoder + decoder) / 1e6:>7.1f}M  {suits(name):<11} "
              f"{c.decoder_embed_dim}/{c.decoder_depth}/{c.decoder_num_heads}")
    print("\nParameters for 3 channels, without the CL-MAE masking module. 'suits': the native image sizes (shorter "
          "side) for which `clmae pretrain` picks the model when no --model is given; the image size follows the "
          "data (e.g. vit_tiny_patch8_64 trains 50 px images at 48 px). --img-size / --patch-size override.")
    return 0


def build_parser() -> argparse.ArgumentParser:
    # Sub-commands living next to the code they drive: each module has ``add_cli(subparsers)``.
    from . import compare, eval_cli, export, report, visualize

    parser = ArgumentParser(prog="clmae", description="Curriculum-Learned Masked Autoencoders for ViTs")
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
    except BrokenPipeError:  # `clmae models | head`: the reader is gone; say nothing more, as a shell tool would
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + 13  # SIGPIPE


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
