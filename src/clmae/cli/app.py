"""The ``clmae`` command line. Each sub-command is a thin layer over the Python API.

Every sub-command's parser is built here (``clmae eval``'s in :mod:`clmae.cli.eval`) from torch-free
modules: the configuration, the registries and the option dataclasses. What a command runs is
imported when it runs, so ``--help`` and usage errors answer at once, without importing torch
(tests/test_cli_startup.py holds the parser to that).

Errors a user can fix (:class:`clmae.errors.ClmaeError`) and usage errors print one line,
``clmae: error: ...``, and exit with code 2. A pretraining run stopped by a signal exits as a shell
reports a process killed by it, 128 + the signal's number (130 for Ctrl-C, 143 for SIGTERM), after
saving its checkpoint, so ``clmae pretrain ... && clmae eval ...`` never evaluates a half-trained run.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from ..config import CHOICES, FIELDS, load_config_file, make_config, preset_names
from ..errors import ClmaeError, ConfigError
from ..io import EXPORT_FORMATS
from ..maskers import METHODS
from ..options import DEVICE_CHOICES, flag, help_of
from ..version import __version__
from ..viz import VISUALIZE_MAX_IMAGES
from . import eval as eval_cli
from .flags import add_field, with_default


class ArgumentParser(argparse.ArgumentParser):
    """argparse with one-line usage errors: ``clmae: error: ...`` and where to look, exit code 2."""

    def error(self, message: str):
        self.exit(2, f"clmae: error: {message} (see `{self.prog} --help`)\n")


def _add_pretrain(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("pretrain", help="pretrain a ViT with CL-MAE or another masking strategy",
                       description="Pretrain a ViT with CL-MAE (default) or another masking strategy (--method, see "
                                   "`clmae methods`). With no arguments: CL-MAE on the built-in digits set, a few "
                                   "minutes on a CPU. Without --model, the model is chosen from the data's image size "
                                   "(see `clmae models`).")
    p.add_argument("--config", metavar="FILE_OR_PRESET",
                   help=f"YAML file of options, or a shipped preset ({', '.join(preset_names())}); flags override it")
    for name, f in FIELDS.items():
        if name == "resume":
            p.add_argument(flag(name), nargs="?", const="auto", metavar="RUN", dest=name, default=argparse.SUPPRESS,
                           help=with_default(help_of(f), f.default))
        else:
            add_field(p, f, name, name, CHOICES.get(name))
    for method in METHODS.values():  # each strategy's own options, in a group of its own
        fields = {f.name: f for f in dataclasses.fields(method.options)}
        if fields:
            group = p.add_argument_group(f"--method {method.name} options")
            for key, name in method.options.keys().items():
                add_field(group, fields[name], key, key)
    p.set_defaults(func=_run_pretrain)


def _run_pretrain(args: argparse.Namespace) -> int:
    from ..train.trainer import Trainer

    given = {k: v for k, v in vars(args).items() if k not in ("config", "func", "command")}
    defaults = load_config_file(args.config) if args.config else None
    cfg = make_config(given, defaults)
    recorded = cfg.to_dict()  # a preset's options for another method were dropped: not overrides either
    overrides = {k: v for k, v in {**(defaults or {}), **given}.items() if k in recorded}
    trainer = Trainer(cfg, overrides=overrides if cfg.resume else None)
    if trainer.dist.is_main:
        print(header_line(trainer), file=sys.stderr)
    return trainer.fit().exit_code  # the summary is printed by the run's console


def header_line(trainer) -> str:
    """What runs on what, in which precision, and why this model: ``clmae: clmae on x.npz (2048 images, 28 px,
    gray), model …, device cuda:0, bf16, output …``."""
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
            f"{mc.patch_size} px, device {trainer.device}, {trainer.precision}, output {trainer.output_dir}")


def _add_models(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("models", help="list the named model configurations")
    p.set_defaults(func=_run_models)


def _add_methods(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("methods", help="list the masking strategies (--method)")
    p.set_defaults(func=_run_methods)


def _run_methods(args: argparse.Namespace) -> int:
    for name, method in METHODS.items():
        cost = f" (cost: {method.cost})" if method.cost else ""
        print(f"{name:<10} {method.summary}{cost}")
    print("\nCost: training compute relative to MAE's at the same epochs, counted with FlopCounterMode on "
          "vit_mini_patch4_32 (benchmarks/throughput.py); it varies with the model.")
    return 0


def _run_models(args: argparse.Namespace) -> int:
    from ..models.configs import DEFAULT_BANDS, MODEL_CONFIGS, SUITS, param_count

    defaults = {name for _, _, name in DEFAULT_BANDS}

    def suits(name: str) -> str:
        lo, hi = SUITS.get(name, (None, None))
        text = "" if lo is None else (f">= {lo} px" if hi is None else f"{lo}-{hi} px")
        return text + ("" if name in defaults or not text else "*")

    print(f"{'name':<22} {'img':>4} {'patch':>5} {'width':>5} {'depth':>5} {'heads':>5} {'encoder':>8} "
          f"{'total':>8}  {'suits':<11} decoder (w/d/h)")
    for name, c in sorted(MODEL_CONFIGS.items(), key=lambda kv: (kv[1].embed_dim * kv[1].depth, kv[1].img_size)):
        encoder, decoder = param_count(c)
        print(f"{name:<22} {c.img_size:>4} {c.patch_size:>5} {c.embed_dim:>5} {c.depth:>5} {c.num_heads:>5} "
              f"{encoder / 1e6:>7.1f}M {(encoder + decoder) / 1e6:>7.1f}M  {suits(name):<11} "
              f"{c.decoder_embed_dim}/{c.decoder_depth}/{c.decoder_num_heads}")
    print("\nParameters for 3 channels, without the CL-MAE masking module. 'suits': the native image sizes (shorter "
          "side) for which `clmae pretrain` picks the model when no --model is given; the image size follows the "
          "data (e.g. vit_tiny_patch8_64 trains 50 px images at 48 px). *: never picked by default, give --model "
          "(a cheaper or larger model for the same sizes). --img-size / --patch-size override.")
    return 0


def _add_compare(sub: argparse._SubParsersAction) -> None:
    """``clmae compare RUN_OR_JSON ...`` (:mod:`clmae.evaluation.compare`)."""
    c = sub.add_parser("compare", help="table and bar chart of several evaluation reports",
                       description="Compare evaluation reports: JSON files or run folders (their eval-*.json). "
                                   "Reports evaluated differently (dataset, split sizes, subset seeds, pooling, "
                                   "image size, hyper-parameters) are refused unless --allow-mismatch.")
    c.add_argument("inputs", nargs="+", metavar="RUN_OR_JSON")
    c.add_argument("--output-dir", default=None, metavar="DIR",
                   help="where compare.md and compare.png go (default: beside the first report)")
    c.add_argument("--markdown", default=None, metavar="FILE.md", help="markdown table (default OUTPUT_DIR/compare.md)")
    c.add_argument("--plot", default=None, metavar="FILE.png", help="bar chart (default OUTPUT_DIR/compare.png)")
    c.add_argument("--allow-mismatch", action="store_true",
                   help="tabulate reports evaluated differently anyway, as separate rows, listing the differences")
    c.set_defaults(func=_run_compare)


def _run_compare(args: argparse.Namespace) -> int:
    from ..evaluation.compare import compare, default_output_dir, format_terminal

    out = Path(args.output_dir) if args.output_dir else default_output_dir(args.inputs)
    markdown = Path(args.markdown) if args.markdown else out / "compare.md"
    plot = Path(args.plot) if args.plot else out / "compare.png"
    table = compare(args.inputs, markdown, plot, args.allow_mismatch)  # refuses before writing anything
    print(format_terminal(table))
    print(f"markdown: {markdown}\nchart: {plot}", file=sys.stderr)
    return 0


def _add_visualize(sub: argparse._SubParsersAction) -> None:
    """``clmae visualize --checkpoint RUN`` (:mod:`clmae.viz.visualize`)."""
    p = sub.add_parser("visualize", help="draw learned masks and reconstructions of a checkpoint as a PNG grid",
                       description="One row per image: original, masking-module scores, learned mask, reconstruction "
                                   "under it, random mask, reconstruction under it (MAE checkpoints: random only).")
    p.add_argument("--checkpoint", required=True, metavar="PATH", help="run folder, .safetensors or .pt")
    p.add_argument("--data", help="dataset (default: the one the checkpoint was trained on)")
    p.add_argument("--data-dir", help="where cifar10 etc. are looked for")
    p.add_argument("--split", default="test", choices=["train", "test"], help="which split to draw images from")
    p.add_argument("--num-images", type=int, default=8, help=f"rows of the grid (1 to {VISUALIZE_MAX_IMAGES})")
    p.add_argument("--seed", type=int, default=0, help="which images and which random masks")
    p.add_argument("--device", default="auto", help=DEVICE_CHOICES)
    p.add_argument("--output", metavar="FILE.png", help="default: visualize.png in the run folder")
    p.set_defaults(func=_run_visualize)


def _run_visualize(args: argparse.Namespace) -> int:
    from ..viz.visualize import visualize_checkpoint

    path = visualize_checkpoint(args.checkpoint, args.data, args.data_dir, args.num_images, args.output, args.split,
                                args.seed, args.device)
    print(path)
    return 0


def _add_report(sub: argparse._SubParsersAction) -> None:
    """``clmae report RUN_DIR`` (:mod:`clmae.viz.report`)."""
    p = sub.add_parser("report", help="write an HTML report of a run (curves, masks over training, config, evaluation)",
                       description="One self-contained HTML file (figures embedded) plus the figures as PNGs.")
    p.add_argument("run_dir", metavar="RUN_DIR", help="the run's output folder")
    p.add_argument("--output", metavar="FILE.html", help="default: RUN_DIR/report.html")
    p.add_argument("--max-images", type=int, default=6, help="probe images shown in the mask-evolution grids")
    p.set_defaults(func=_run_report)


def _run_report(args: argparse.Namespace) -> int:
    from ..viz.report import build_report

    if args.max_images < 1:
        raise ConfigError(f"--max-images: got {args.max_images}, expected an integer >= 1")
    print(build_report(args.run_dir, args.output, args.max_images))
    return 0


def _add_export(sub: argparse._SubParsersAction) -> None:
    """``clmae export --checkpoint RUN --format timm|hf`` (:mod:`clmae.io.export`)."""
    p = sub.add_parser("export", help="export the encoder for timm or Hugging Face transformers",
                       description="Write the trained encoder (no decoder, masking module or mask token) as "
                                   "safetensors: --format timm for timm.create_model('local-dir:DIR', "
                                   "pretrained=True), --format hf for transformers' ViTModel.from_pretrained(DIR).")
    p.add_argument("--checkpoint", required=True, help="run folder, .safetensors or .pt checkpoint")
    p.add_argument("--format", required=True, choices=EXPORT_FORMATS, dest="fmt", help="timm or hf")
    p.add_argument("--output", required=True, help="folder to write")
    p.add_argument("--overwrite", action="store_true", help="replace an existing export in --output")
    p.add_argument("--img-size", type=int, default=None, metavar="N",
                   help="export the encoder for N x N inputs (position embeddings resampled bicubically, as timm "
                        "does; default: the pretraining size)")
    p.add_argument("--no-verify", dest="verify", action="store_false",
                   help="skip reloading the export and comparing features")
    p.set_defaults(func=_run_export)


def _run_export(args: argparse.Namespace) -> int:
    from ..io.export import export_encoder

    result = export_encoder(args.checkpoint, args.fmt, args.output, args.overwrite, args.verify, args.img_size)
    print(result.summary())
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The whole ``clmae`` parser; building it imports no torch (tests/test_cli_startup.py)."""
    parser = ArgumentParser(prog="clmae", description="Curriculum-Learned Masked Autoencoders for ViTs")
    parser.add_argument("--version", action="version", version=f"clmae {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_pretrain(sub)
    _add_models(sub)
    _add_methods(sub)
    eval_cli.add_cli(sub)
    _add_compare(sub)
    _add_visualize(sub)
    _add_report(sub)
    _add_export(sub)
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
