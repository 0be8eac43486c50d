"""The ``clmae eval`` command: one sub-command per protocol and ``all``, flags built from the option dataclasses.

``clmae eval all --protocols knn,linear,fewshot`` runs several protocols on one checkpoint with one
feature extraction per encoder; each protocol's hyper-parameters get its name as a prefix there
(``--linear-lrs``, ``--fewshot-shots``), since several protocols share field names.

The flags come from the torch-free option dataclasses (:mod:`clmae.evaluation.options`); the evaluation
itself (:mod:`clmae.evaluation.runner`, torch) is imported when a protocol runs, so ``--help`` and usage
errors answer at once.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import ClmaeError, ConfigError
from ..evaluation.options import FROZEN_PROTOCOLS, PROTOCOLS, EvalOptions, config_class, protocol_config
from ..options import check_option, one_of
from .flags import add_dataclass_flags, collect

if TYPE_CHECKING:
    from ..evaluation.runner import EvalSetup


def _protocol_list(text: str) -> tuple[str, ...]:
    names = tuple(t.strip() for t in text.split(",") if t.strip())
    for name in names:
        if name not in PROTOCOLS:
            raise argparse.ArgumentTypeError(f"unknown protocol {name!r}; choose from {one_of(PROTOCOLS)}")
    return names


def _common_flags(q: argparse.ArgumentParser) -> None:
    q.add_argument("--checkpoint", required=True, metavar="PATH", help="run folder, .safetensors or .pt")
    q.add_argument("--data", default=None,
                   help="digits, cifar10, an .npz with labels, or an image folder with train/ and val/ "
                        "(default: the checkpoint's pretraining data)")
    q.add_argument("--data-dir", default=None, help="where cifar10 etc. are looked for")
    add_dataclass_flags(q, EvalOptions, "opt__")


def add_cli(sub: argparse._SubParsersAction) -> None:
    """``clmae eval knn|linear|fewshot|finetune|all``."""
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
        _common_flags(q)
        q.add_argument("--output", default=None, metavar="FILE.json",
                       help="where to write the report (default: RUN/eval-PROTOCOL-DATA.json)")
        add_dataclass_flags(q, config_class(name), "cfg__")
        q.set_defaults(func=_run_eval)
    text = ("several protocols with one feature extraction per encoder; writes RUN/eval-PROTOCOL-DATA.json for "
            "each and the table RUN/eval-summary-DATA.md")
    q = protocols.add_parser("all", help=text, description=text + ". Protocol hyper-parameters take the "
                             "protocol's name as prefix: --knn-k-majority, --linear-lrs, --fewshot-shots, …")
    _common_flags(q)
    q.add_argument("--protocols", type=_protocol_list, default=FROZEN_PROTOCOLS, metavar="P,P,...",
                   help=f"protocols to run, from {','.join(PROTOCOLS)} (default {','.join(FROZEN_PROTOCOLS)})")
    for name in PROTOCOLS:
        add_dataclass_flags(q, config_class(name), f"cfg_{name}__", flag_prefix=f"{name}-")
    q.set_defaults(func=_run_all)


def _announce(setup: EvalSetup, what: str) -> None:
    from ..evaluation.results import pretrain_position

    print(f"clmae: {what} on {setup.data} ({len(setup.train)} train / {len(setup.test)} test, "
          f"{setup.num_classes} classes, {setup.img_size} px), {setup.model_name} from {setup.checkpoint_file}, "
          f"device {setup.device}", file=sys.stderr)
    for note in setup.notes:
        print(f"clmae: note: {note}", file=sys.stderr)
    if setup.options.holdout is not None:
        print(f"clmae: note: {len(setup.test)} images of the training split held out at random (--holdout "
              f"{setup.options.holdout}, seed {setup.options.seed}) as the test split; the report records it",
              file=sys.stderr)
    p = pretrain_position(setup)
    if p["interrupted"]:
        print(f"clmae: note: this checkpoint was saved after {p['epochs_completed']} of {p['epochs_planned']} "
              "pretraining epochs (the run was stopped early); the reports say so", file=sys.stderr)


def _run_eval(args: argparse.Namespace) -> int:
    from ..evaluation.results import default_output, summary_lines, write_report
    from ..evaluation.runner import prepare, run_protocols, say_if_below_random

    options = EvalOptions(**collect(args, "opt__"))
    config = protocol_config(args.protocol, **collect(args, "cfg__"))
    setup = prepare(args.checkpoint, args.data, args.data_dir, options)
    _announce(setup, args.protocol)
    report = run_protocols(setup, {args.protocol: config})[args.protocol]
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
    say_if_below_random([report])
    return 0


def _run_all(args: argparse.Namespace) -> int:
    from ..evaluation.results import default_output, summary_output, summary_table, write_report, write_summary
    from ..evaluation.runner import prepare, run_protocols, say_if_below_random

    names = args.protocols
    check_option(len(names) >= 1 and len(set(names)) == len(names), "protocols", ",".join(names),
                 "one or more distinct protocols")
    given = {name: collect(args, f"cfg_{name}__") for name in PROTOCOLS}
    unused = [name for name in PROTOCOLS if given[name] and name not in names]
    if unused:
        raise ConfigError(f"--protocols: options were given for {', '.join(unused)}, which is not run; add it to "
                         "--protocols or drop its options")
    configs = {name: protocol_config(name, **given[name]) for name in names}
    options = EvalOptions(**collect(args, "opt__"))
    setup = prepare(args.checkpoint, args.data, args.data_dir, options)
    _announce(setup, ", ".join(names))
    reports = run_protocols(setup, configs)
    written = [write_report(r, default_output(args.checkpoint, name, setup.data)) for name, r in reports.items()]
    table = summary_table(list(reports.values()))
    written.append(write_summary(table, summary_output(args.checkpoint, setup.data)))
    print(table)
    for path in written:
        print(f"wrote {path}", file=sys.stderr)
    say_if_below_random(list(reports.values()))
    return 0
