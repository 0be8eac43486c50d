"""The parts of a training run, each built by one small function: :class:`~clmae.train.trainer.Trainer` assembles them.

Order matters and is the order below: the configuration (a ``--resume`` continues the saved one),
the processes and the device, the data (it decides the model), the run folder (created only once
the data and the model were checked), the models (from the run's seed, without touching the
caller's random state), the optimisers, and what runs the models (DDP, ``torch.compile``).
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..config import PretrainConfig
from ..data.datasets import Dataset, FolderData, load_dataset, scan_data
from ..data.loader import ShardBatches, TrainBatches, worker_count
from ..data.shards import ShardData
from ..distributed import SINGLE, DistContext, on_main, wrap
from ..distributed import setup as setup_distributed
from ..io.mae_import import load_mae_checkpoint
from ..maskers import Masker, create_masker
from ..models.configs import ModelChoice, ModelConfig, model_config, resolve_model
from ..models.mae import MaskedAutoencoderViT
from ..optim import make_optimizer
from ..runtime import grad_scaler, resolve_device, resolve_precision, training_threads
from ..viz.probe import CurriculumProbe
from .callbacks import HeldOutKnn
from .run_folder import OutputFolder, RunState, default_output_dir, prepare_output_dir, resume_config


def build_config(config: PretrainConfig, overrides: dict[str, Any] | None) -> tuple[PretrainConfig, Path | None,
                                                                                     str | None]:
    """``(config, resume file or None, note)``: the validated config, or for ``--resume`` the saved one."""
    cfg = config.validate()
    if not cfg.resume:
        return cfg, None, None
    resumed = resume_config(cfg, overrides)
    return resumed.config, resumed.path, resumed.note


def build_runtime(cfg: PretrainConfig) -> tuple[DistContext, torch.device]:
    """One process per device under torchrun (:mod:`clmae.distributed`), a single one otherwise; on the CPU, the
    threads it computes with (:func:`clmae.runtime.training_threads`)."""
    dist = setup_distributed(cfg.device) or SINGLE
    device = dist.device if dist.enabled else resolve_device(cfg.device)
    local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1) if dist.enabled else 1
    threads = training_threads(cfg.threads, device, local_ranks)
    if threads is not None and threads != torch.get_num_threads():
        torch.set_num_threads(threads)
    return dist, device


@dataclass
class Precision:
    """What the run computes in (``fp32``, ``bf16``, ``fp16``) and fp16's loss scalers: one for the MAE step
    (and a strategy trained in it), one for the strategy's own step, each with its own scale."""

    name: str
    scaler_mae: torch.amp.GradScaler | None = None
    scaler_masker: torch.amp.GradScaler | None = None


def build_precision(cfg: PretrainConfig, device: torch.device) -> Precision:
    """``--precision`` resolved on this device (:func:`clmae.runtime.resolve_precision`), checked before the run
    folder exists; its scalers come with the models (:func:`build_scalers`)."""
    return Precision(resolve_precision(cfg.precision, device))


def build_scalers(precision: Precision, device: torch.device, masker: Masker) -> Precision:
    """fp16's loss scalers: the MAE step's, and the strategy's own step's when it has one."""
    own = masker.learnable and masker.has_own_step
    return Precision(precision.name, grad_scaler(device, precision.name),
                     grad_scaler(device, precision.name) if own else None)


@dataclass
class RunData:
    """The training data and what it decided: its native size and channels, the model and its sizes."""

    dataset: Dataset
    scan: Any  # clmae.data.datasets.DataScan
    model_choice: ModelChoice
    model_config: ModelConfig
    batches: TrainBatches | ShardBatches


def build_data(cfg: PretrainConfig, dist: DistContext, device: torch.device) -> RunData:
    """The training set, the model that fits it (without ``--model``, by its native size) and this rank's batches.

    In-memory sets keep their channels; folders are read as RGB, or grayscale when every sampled image is.
    """
    dataset = load_dataset(cfg.data, cfg.data_dir, "train").subset(cfg.subset)
    scan = scan_data(dataset)
    if isinstance(dataset, FolderData):
        dataset = dataset.with_channels(scan.channels)
    choice = resolve_model(cfg.model, cfg.img_size, cfg.patch_size, scan.size, dataset.channels, scan.note)
    mc = model_config(choice.name, in_chans=dataset.channels, img_size=choice.img_size, patch_size=choice.patch_size,
                      norm_pix_loss=cfg.norm_pix_loss or None)
    kind = ShardBatches if isinstance(dataset, ShardData) else TrainBatches
    batches = kind(dataset, cfg.batch_size, mc.img_size, device, cfg.seed, worker_count(cfg.num_workers), dist,
                   prefetch=cfg.prefetch, augment_on=cfg.augment_on, decode_on=cfg.decode_on)
    return RunData(dataset, scan, choice, mc, batches)


def build_run_state(cfg: PretrainConfig, data: RunData, resuming: bool, dist: DistContext) -> tuple[RunState,
                                                                                                   OutputFolder]:
    """The run folder (created on rank 0 now that the set-up was checked) and the values resolved at start."""
    wanted = Path(cfg.output_dir) if cfg.output_dir else default_output_dir(cfg)
    folder = on_main(lambda: prepare_output_dir(wanted, resuming=resuming, claim_new=not cfg.output_dir), dist)
    mc = data.model_config
    run = RunState(folder.path, data.model_choice.name, cfg.warmup(), cfg.snapshot_interval(), img_size=mc.img_size,
                   patch_size=mc.patch_size)
    return run, folder


def build_models(cfg: PretrainConfig, mc: ModelConfig, device: torch.device,
                 dist: DistContext) -> tuple[MaskedAutoencoderViT, Masker]:
    """The autoencoder and the masking strategy, initialised from ``--seed`` (or ``--init-from``).

    The initialisation draws from torch's global generator, seeded inside ``fork_rng``: a run's
    weights depend on its seed alone, and the caller's random state is left as it was.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        mae = MaskedAutoencoderViT(mc).to(device)
        if cfg.init_from and not cfg.resume:
            report = load_mae_checkpoint(cfg.init_from, mae)
            if dist.is_main:
                print(f"clmae: initialised from {cfg.init_from}: {report.summary()}", file=sys.stderr)
        masker = create_masker(cfg.method, mc, cfg).to(device)
    masker.attach(mae)  # EMA strategies copy the starting weights (a resume then restores theirs)
    return mae, masker


def build_optimizers(cfg: PretrainConfig, mae: torch.nn.Module, masker: Masker, device: torch.device,
                     world_size: int) -> tuple[float, torch.optim.Optimizer, torch.optim.Optimizer | None]:
    """``(peak lr, the MAE's AdamW, the strategy's or None)``: one per part, on one schedule, so the part
    frozen in a step is never touched by the other part's weight decay or momentum."""
    lr = cfg.absolute_lr(world_size)
    opt_masker = make_optimizer(masker, lr, cfg.weight_decay, device) if masker.learnable else None
    return lr, make_optimizer(mae, lr, cfg.weight_decay, device), opt_masker


def build_forward(cfg: PretrainConfig, mae: torch.nn.Module, masker: Masker, dist: DistContext):
    """``(mae_ddp, mae_forward)``: the MAE wrapped for DDP (after every weight is in place) and what the MAE
    step calls (compiled with ``--compile``, as is the strategy's own network)."""
    mae_ddp = wrap(mae, dist)
    if cfg.compile and masker.learnable:
        masker.compile()  # CL-MAE's scoring network and soft path, HPM's loss predictor
    return mae_ddp, (torch.compile(mae_ddp) if cfg.compile else mae_ddp)


def build_callbacks(cfg: PretrainConfig, view, console, dist: DistContext) -> list:
    """``--eval-every``'s k-NN, the curriculum probe (on data with random access) and the console, on rank 0."""
    if not dist.is_main:
        return []
    callbacks = [HeldOutKnn()] if cfg.eval_every else []
    if cfg.probe_every or view.snapshot_every:
        if isinstance(view.dataset, ShardData):
            print("clmae: the curriculum probe needs random access to images; it is off for tar shards",
                  file=sys.stderr)
        else:
            callbacks.append(CurriculumProbe(view))
    return callbacks + [console]
