"""The encoder round-trips into timm and transformers; MAE checkpoints load into clmae."""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import load_file

from clmae.cli.app import main as cli_main
from clmae.config import make_config
from clmae.data.datasets import load_dataset
from clmae.data.images import normalize, resize_images
from clmae.errors import CheckpointError, ConfigError
from clmae.io.checkpoint import save_weights
from clmae.io.export import export_hf, export_timm
from clmae.io.mae_import import load_mae_checkpoint
from clmae.maskers import create_masker
from clmae.models.mae import create_model
from clmae.train.trainer import Trainer


def scrambled(name: str = "vit_micro_patch2_8", seed: int = 0):
    """A model whose every parameter (biases and norms included) is random, so a mapping mistake shows."""
    torch.manual_seed(seed)
    mae = create_model(name)
    with torch.no_grad():
        for p in mae.parameters():
            p.normal_(0.0, 0.2)
    return mae.eval()


@pytest.fixture(scope="module")
def digits_batch() -> torch.Tensor:
    ds = load_dataset("digits", split="test")
    return normalize(resize_images(ds.images[:6], 8), ds.mean, ds.std)


@pytest.fixture(scope="module")
def run_checkpoint(tmp_path_factory) -> Path:
    """A clmae checkpoint (weights of the MAE and a masking module) as training writes it."""
    mae = scrambled()
    masker = create_masker("clmae", mae.config)
    path = tmp_path_factory.mktemp("run") / "checkpoint-last.safetensors"
    meta = {"model_config": dataclasses.asdict(mae.config), "run_config": {"model": "vit_micro_patch2_8"},
            "data": {"name": "digits", "mean": [0.3], "std": [0.4], "channels": 1, "img_size": 8}}
    save_weights(path, {"mae": mae, "masker": masker}, meta)
    return path


def test_cli_export_timm_loads_strictly_with_same_features(run_checkpoint, tmp_path, digits_batch):
    out = tmp_path / "timm"
    assert cli_main(["export", "--checkpoint", str(run_checkpoint), "--format", "timm", "--output", str(out)]) == 0
    cfg = json.loads((out / "config.json").read_text())
    exported = load_file(str(out / "model.safetensors"))
    assert not [k for k in exported if k.startswith(("decoder", "mask_token", "masker"))]
    assert cfg["num_classes"] == 0 and cfg["global_pool"] == "token"
    assert cfg["pretrained_cfg"]["mean"] == [0.3] and cfg["pretrained_cfg"]["input_size"] == [1, 8, 8]

    # The documented call: the architecture, our file, the model_args.
    model = timm.create_model(cfg["architecture"], pretrained=True,
                              pretrained_cfg_overlay=dict(file=str(out / "model.safetensors"), num_classes=0),
                              **cfg["model_args"]).eval()
    assert set(model.state_dict()) == set(exported)  # nothing missing, nothing left over
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, exported[k], rtol=0, atol=0)
    ours = scrambled()
    with torch.no_grad():
        theirs = model.forward_features(digits_batch)[:, 0]
        torch.testing.assert_close(theirs, ours.forward_features(digits_batch, "cls"), rtol=1e-5, atol=1e-5)
        assert model(digits_batch).shape == (6, 64)  # no head: the pooled CLS feature
    # The folder alone also works (timm's local-dir source reads config.json).
    local = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    with torch.no_grad():
        torch.testing.assert_close(local.forward_features(digits_batch)[:, 0], theirs, rtol=0, atol=0)


def test_timm_pos_embed_is_our_sincos_with_cls_slot(tmp_path):
    mae = scrambled()
    export_timm(mae, tmp_path / "t", verify=False)
    pos = load_file(str(tmp_path / "t" / "model.safetensors"))["pos_embed"]
    assert pos.shape == (1, 1 + 16, 64)
    torch.testing.assert_close(pos, mae.pos_embed)
    assert float(pos[0, 0].abs().max()) == 0.0  # the CLS slot: zeros, as in MAE


def test_export_hf_matches_transformers_vit(run_checkpoint, tmp_path, digits_batch):
    from transformers import ViTModel

    result = export_hf(run_checkpoint, tmp_path / "hf")
    assert "transformers CLS features match" in result.verified
    model, info = ViTModel.from_pretrained(str(tmp_path / "hf"), add_pooling_layer=False, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    ours = scrambled()
    with torch.no_grad():
        theirs = model.eval()(pixel_values=digits_batch).last_hidden_state
        torch.testing.assert_close(theirs[:, 0], ours.forward_features(digits_batch, "cls"), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(theirs[:, 1:].mean(1), ours.forward_features(digits_batch, "mean"),
                                   rtol=1e-5, atol=1e-5)
    pre = json.loads((tmp_path / "hf" / "preprocessor_config.json").read_text())
    assert pre["image_mean"] == [0.3] and pre["size"] == {"height": 8, "width": 8}


def test_export_refuses_to_overwrite(run_checkpoint, tmp_path, capsys):
    args = ["export", "--checkpoint", str(run_checkpoint), "--format", "timm", "--output", str(tmp_path),
            "--no-verify"]
    assert cli_main(args) == 0
    assert cli_main(args) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert cli_main(args + ["--overwrite"]) == 0


# ---------------------------------------------------------------------------------------------
# Import of facebookresearch/mae checkpoints


def mae_style_file(path: Path, mae, decoder: bool = True, extra: dict | None = None) -> Path:
    """A file laid out like facebookresearch/mae's: {'model', 'optimizer', 'epoch', 'args': Namespace}."""
    state = {k: v.clone() for k, v in mae.state_dict().items()
             if decoder or not k.startswith(("decoder", "mask_token"))}
    state["pos_embed"] = mae.pos_embed.clone()
    if decoder:
        state["decoder_pos_embed"] = mae.decoder_pos_embed.clone()
    state.update(extra or {})
    args = argparse.Namespace(model="mae_vit_micro", norm_pix_loss=True, mask_ratio=0.75, blr=1.5e-4)
    torch.save({"model": state, "optimizer": {"state": {}, "param_groups": []}, "epoch": 399, "args": args}, path)
    return path


def test_load_mae_checkpoint_with_namespace_args(tmp_path):
    source = scrambled(seed=1)
    path = mae_style_file(tmp_path / "checkpoint-399.pth", source)
    target = create_model("vit_micro_patch2_8")
    report = load_mae_checkpoint(path, target)
    for k, v in source.state_dict().items():
        torch.testing.assert_close(target.state_dict()[k], v, rtol=0, atol=0)
    assert report.decoder == "loaded" and report.args["blr"] == 1.5e-4
    assert "norm_pix_loss=True" in report.summary()  # the target model does not use it: said so


def test_load_encoder_only_keeps_new_decoder(tmp_path):
    source = scrambled(seed=2)
    target = create_model("vit_micro_patch2_8")
    decoder_before = target.decoder_pred.weight.clone()
    report = load_mae_checkpoint(mae_style_file(tmp_path / "enc.pth", source, decoder=False), target)
    assert report.decoder.startswith("new")
    torch.testing.assert_close(target.blocks[0].attn.qkv.weight, source.blocks[0].attn.qkv.weight)
    torch.testing.assert_close(target.decoder_pred.weight, decoder_before)


def test_load_refuses_classifier_and_learned_pos_embed(tmp_path):
    source = scrambled(seed=3)
    head = {"head.weight": torch.zeros(10, 64), "head.bias": torch.zeros(10)}
    with pytest.raises(CheckpointError, match="fine-tuned classifier"):
        load_mae_checkpoint(mae_style_file(tmp_path / "ft.pth", source, extra=head), create_model("vit_micro_patch2_8"))
    learned = {"pos_embed": torch.randn(1, 17, 64)}
    with pytest.raises(CheckpointError, match="sin-cos"):
        load_mae_checkpoint(mae_style_file(tmp_path / "pe.pth", source, extra=learned),
                            create_model("vit_micro_patch2_8"))
    with pytest.raises(CheckpointError, match="shape mismatch|pos_embed has shape"):
        load_mae_checkpoint(mae_style_file(tmp_path / "b.pth", source),
                            create_model("vit_micro_patch2_8", patch_size=4))


class Payload:
    """Unpickling this would create a file: the loader must refuse before that."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_load_refuses_pickled_code(tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"model": {"cls_token": torch.zeros(1)}, "args": Payload(str(marker))}, tmp_path / "evil.pth")
    with pytest.raises(CheckpointError, match="refused to load.*weights"):
        load_mae_checkpoint(tmp_path / "evil.pth", create_model("vit_micro_patch2_8"))
    assert not marker.exists()


def test_pretrain_init_from_mae_checkpoint(tmp_path):
    source = scrambled(seed=4)
    path = mae_style_file(tmp_path / "mae.pth", source)
    cfg = make_config({"data": "digits", "model": "vit_micro_patch2_8", "init_from": str(path), "subset": 64,
                       "batch_size": 32, "epochs": 1, "device": "cpu", "progress": False, "probe_every": 0,
                       "snapshot_every": 0, "output_dir": str(tmp_path / "run")})
    trainer = Trainer(cfg)
    for k, v in source.state_dict().items():
        torch.testing.assert_close(trainer.mae.state_dict()[k], v, rtol=0, atol=0)
    # An exported timm folder (encoder only) is a valid starting point too.
    export_timm(source, tmp_path / "timm", verify=False)
    target = create_model("vit_micro_patch2_8")
    assert load_mae_checkpoint(tmp_path / "timm", target).decoder.startswith("new")
    torch.testing.assert_close(target.norm.weight, source.norm.weight)


def test_a_failed_overwrite_leaves_the_earlier_export_whole(tmp_path, monkeypatch):
    """`clmae export --overwrite` builds the new export beside the old one and swaps folders: a failure
    at any point (here the last rename) leaves the earlier export exactly as it was, never half replaced."""
    import os

    out = tmp_path / "timm"
    export_timm(scrambled(seed=0), out, verify=False)
    (out / "README.md").write_text("the user's notes")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    real_rename = os.rename
    failed = []

    def failing_rename(src, dst):  # the new export's move into place fails (putting the old one back works)
        if Path(dst) == out and not failed:
            failed.append(src)
            raise OSError(28, "No space left on device")
        return real_rename(src, dst)

    monkeypatch.setattr(os, "rename", failing_rename)
    with pytest.raises(ConfigError, match="--output: cannot write"):
        export_timm(scrambled(seed=1), out, overwrite=True, verify=False)
    monkeypatch.undo()
    assert failed, "the test did not reach the swap"
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["timm"]

    export_timm(scrambled(seed=1), out, overwrite=True, verify=False)
    assert (out / "model.safetensors").read_bytes() != before["model.safetensors"]
    assert (out / "README.md").read_text() == "the user's notes"
    assert [p.name for p in tmp_path.iterdir()] == ["timm"]
