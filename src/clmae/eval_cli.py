"""The ``clmae eval`` command: one sub-command per protocol, flags built from the option dataclasses."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path
from typing import Any

from .checkpoint import checkpoint_file
from .errors import ClmaeError
from .evaluation import POOLS, PROTOCOLS, EvalOptions, config_class, prepare, protocol_config, run_protocol
from .options import help_of
from .reports import default_output, summary_lines, write_report


def _add_dataclass_flags(parser: argparse.ArgumentParser, cls: type, dest_prefix: str, skip=()) -> None:
    """One ``--flag`` per dataclass field (tuples as comma-separated lists), stored as ``PREFIX__name``."""
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        flag = "--" + f.name.replace("_", "-")
        kind = str(f.type)
        default = f.default
        kw = {"dest": f"{dest_prefix}__{f.name}", "default": argparse.SUPPRESS}
        text = help_of(f)
        if kind.startswith("bool"):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, help=f"{text} (default {default})", **kw)
        elif kind.startswith("tuple"):
            conv = float if "float" in kind else int

            def parse_list(text: str, conv=conv, flag=flag):
                try:
                    return tuple(conv(v) for v in text.split(",") if v.strip())
                except ValueError:
                    msg = f"{flag}: expected comma-separated numbers, got {text!r}"
                    raise argparse.ArgumentTypeError(msg) from None

            parser.add_argument(flag, type=parse_list, metavar="A,B,...",
                                help=f"{text} (default {','.join(str(v) for v in default)})", **kw)
        else:
            conv = float if kind.startswith("float") else int if kind.startswith("int") else str
            metavar = {float: "X", int: "N", str: "TEXT"}[conv]
            choices = list(POOLS) if f.name == "pool" else None
            parser.add_argument(flag, type=conv, metavar=None if choices else metavar, choices=choices,
                                help=f"{text} (default {default})", **kw)


def _collect(args: argparse.Namespace, prefix: str) -> dict[str, Any]:
    p = prefix + "__"
    return {k[len(p):]: v for k, v in vars(args).items() if k.startswith(p)}


def add_cli(sub: argparse._SubParsersAction) -> None:
    """``clmae eval knn|linear|fewshot|finetune``."""
    p = sub.add_parser("eval", help="evaluate a pretrained encoder (k-NN, linear probe, few-shot, fine-tuning)",
                       description="Evaluate a checkpoint on a labeled dataset; every protocol also runs on a "
                                   "randomly initialised encoder of the same architecture as a reference.")
    protocols = p.add_subparsers(dest="protocol", metavar="PROTOCOL", required=True)
    helps = {"knn": "k-NN on frozen features (k=5 Euclidean majority and k=20 cosine weighted)",
             "linear": "linear probe on frozen features (lr chosen on a validation split of train)",
             "fewshot": "n-shot linear classifiers, mean ± std over random support sets",
             "finetune": "full fine-tuning with layer-wise lr decay, drop path, label smoothing"}
    for name in PROTOCOLS:
        q = protocols.add_parser(name, help=helps[name], description=helps[name])
        q.add_argument("--checkpoint", required=True, metavar="PATH", help="run folder, .safetensors or .pt")
        q.add_argument("--data", default=None,
                       help="digits, cifar10, an .npz with labels, or an image folder with train/ and val/ "
                            "(default: the checkpoint's pretraining data)")
        q.add_argument("--data-dir", default=None, help="where cifar10 etc. are looked for")
        q.add_argument("--output", default=None, metavar="FILE.json",
                       help="where to write the report (default: RUN/eval-PROTOCOL-DATA.json)")
        _add_dataclass_flags(q, EvalOptions, "opt")
        _add_dataclass_flags(q, config_class(name), "cfg")
        q.set_defaults(func=_run_eval)


def _run_eval(args: argparse.Namespace) -> int:
    options = EvalOptions(**_collect(args, "opt"))
    config = protocol_config(args.protocol, **_collect(args, "cfg"))
    setup = prepare(args.checkpoint, args.data, args.data_dir, options)
    print(f"clmae: {args.protocol} on {setup.data} ({len(setup.train)} train / {len(setup.test)} test, "
          f"{setup.num_classes} classes), {setup.model_name} from {checkpoint_file(args.checkpoint)}, "
          f"device {setup.device}", file=sys.stderr)
    report = run_protocol(setup, args.protocol, config)
    output = Path(args.output) if args.output else default_output(args.checkpoint, args.protocol, setup.data)
    try:
        write_report(report, output)
        where = f"report: {output}"
    except ClmaeError as exc:
        if args.output:
            raise
        where = f"report not saved ({exc}); pass --output FILE.json"
    for line in summary_lines(report):
        print(line)
    print(where, file=sys.stderr)
    return 0


