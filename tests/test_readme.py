"""Every code block of the README runs, on tiny settings, so the README cannot drift from the code.

How the blocks are run (the README says so in one line; this is the whole mechanism):

* Fenced blocks tagged ``bash`` or ``python`` run in README order, in one temporary folder. Beforehand the
  folder holds ``my_images.npz`` (600 labeled 28 px grayscale images, 500 train / 100 test) and ``photos/``
  (24 small RGB images of 40-80 px), the files the README's examples name. Blocks with another tag (``text``
  for printed output, ``bibtex``) are not code. A block whose tag has a second word ``no-run``
  (```` ```bash no-run ````) is shown, never run; use it only for what cannot run here (many GPUs, a cluster).
* A shell block runs line by line. ``clmae ARGS`` runs through :func:`clmae.cli.main` in this process with
  :data:`TINY` of its sub-command appended (argparse keeps the last value of a flag, so the tiny settings win
  over the README's ``--epochs``), and must exit 0. ``make run`` runs the real Makefile against a stand-in
  virtual environment whose ``clmae`` is this interpreter with the same tiny settings. ``make test`` is this
  test suite: it is not started again from inside itself.
* A Python block runs with ``exec``, all blocks in one namespace, with ``clmae.pretrain`` given
  :data:`TINY_PYTHON` (overriding the README's values).
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import clmae
from clmae import cli

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
TINY = {
    "pretrain": ["--epochs", "1", "--subset", "32", "--batch-size", "16", "--probe-every", "2", "--probe-images", "4",
                 "--snapshot-every", "1", "--num-workers", "0", "--device", "cpu", "--no-progress"],
    "eval": ["--max-train", "64", "--max-test", "32", "--num-workers", "0", "--device", "cpu", "--no-progress"],
}
# 64 training images hold too few of some classes for the default 5-shot draws.
TINY["eval all"] = [*TINY["eval"], "--fewshot-shots", "1"]
TINY_PYTHON = dict(epochs=1, subset=32, batch_size=16, probe_every=2, probe_images=4, snapshot_every=1, num_workers=0,
                   device="cpu", progress=False)
RUNNABLE = {"bash", "sh", "python"}


def code_blocks(text: str) -> list[tuple[str, list[str], str, int]]:
    """``(language, further words of the tag, code, line number)`` of every fenced block."""
    blocks = []
    for m in re.finditer(r"^```([^\n]*)\n(.*?)^```[ \t]*$", text, flags=re.M | re.S):
        tag = m.group(1).split()
        blocks.append((tag[0] if tag else "", tag[1:], m.group(2), text.count("\n", 0, m.start()) + 1))
    return blocks


def shell_commands(code: str) -> list[list[str]]:
    """The commands of a shell block: one per line (``\\`` continues a line), comments dropped."""
    return [words for line in code.replace("\\\n", " ").splitlines() if (words := shlex.split(line, comments=True))]


def make_inputs(folder: Path) -> None:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (600, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, 600)
    np.savez(folder / "my_images.npz", x_train=images[:500], y_train=labels[:500], x_test=images[500:],
             y_test=labels[500:])
    photos = folder / "photos"
    photos.mkdir()
    for i in range(24):
        w, h = (int(v) for v in rng.integers(40, 81, 2))
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB").save(photos / f"p{i:02d}.png")


def make_run(folder: Path) -> None:
    """``make run`` as written in the Makefile, with this interpreter and the tiny settings as ``.venv/bin/clmae``."""
    venv = folder / "venv"
    (venv / "bin").mkdir(parents=True, exist_ok=True)
    (folder / "pyproject.toml").write_bytes((REPO / "pyproject.toml").read_bytes())
    (venv / ".installed").touch()  # newer than pyproject.toml: `setup` has nothing to do
    stand_in = venv / "bin" / "clmae"
    stand_in.write_text(f"#!{sys.executable}\nimport sys\nsys.path.insert(0, {str(REPO / 'src')!r})\n"
                        f"from clmae.cli.app import main\nTINY = {TINY!r}\n"
                        "sys.exit(main(sys.argv[1:] + TINY.get(sys.argv[1], [])))\n")
    stand_in.chmod(0o755)
    proc = subprocess.run(["make", "-s", "-f", str(REPO / "Makefile"), "run", f"VENV={venv}"], cwd=folder,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "knn" in proc.stdout and "random init" in proc.stdout, proc.stdout  # the k-NN step ran after pretraining
    assert list(folder.glob("runs/default-*/checkpoint-last.pt"))


def test_the_readme_has_runnable_bash_and_python_blocks():
    blocks = code_blocks(README.read_text())
    kinds = [lang for lang, extra, _, _ in blocks if lang in RUNNABLE and "no-run" not in extra]
    assert kinds.count("bash") >= 3 and kinds.count("python") >= 2, kinds
    assert "make run" in blocks[0][2] and "make test" in blocks[0][2]  # the two commands come first


def test_every_readme_code_block_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    make_inputs(tmp_path)
    real_pretrain = clmae.pretrain
    monkeypatch.setattr(clmae, "pretrain", lambda *a, **kw: real_pretrain(*a, **{**kw, **TINY_PYTHON}))
    namespace: dict = {"__name__": "readme"}
    ran = 0
    for lang, extra, code, line in code_blocks(README.read_text()):
        if lang not in RUNNABLE or "no-run" in extra:
            continue
        where = f"README.md line {line}"
        if lang == "python":
            exec(compile(code, where, "exec"), namespace)  # the README's own code, on tiny settings
            ran += 1
            continue
        for words in shell_commands(code):
            if words[:2] == ["make", "test"]:
                continue  # this suite itself
            if words[:2] == ["make", "run"]:
                make_run(tmp_path)
            elif words[0] == "clmae":
                args = words[1:]
                rc = cli.main(args + TINY.get(" ".join(args[:2]), TINY.get(args[0], [])))
                assert rc == 0, f"{where}: `{shlex.join(words)}` exited {rc}: {capsys.readouterr().err[-2000:]}"
            else:
                pytest.fail(f"{where}: the README test does not know how to run `{shlex.join(words)}`; "
                            "run it through clmae, or tag the block `no-run` and say why")
            ran += 1
    assert ran >= 10
    # What the README's Python says it gets: one 192-wide feature vector per image, and a timm model.
    assert tuple(namespace["features"].shape) == (8, 192)
    assert isinstance(namespace["encoder"], torch.nn.Module)
    assert (tmp_path / "runs" / "my-run" / "report.html").is_file()
