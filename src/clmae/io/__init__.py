"""Files in and out: whole-file writes, checkpoints, MAE checkpoints in, encoders out, the metrics log.

* :mod:`clmae.io.atomic` — a file or folder is written whole or not at all (temporary name, fsync, rename).
* :mod:`clmae.io.checkpoint` — clmae checkpoints: safe reading (never a pickle that runs code),
  checks that name what is wrong, :func:`~clmae.io.checkpoint.load_pretrained`.
* :mod:`clmae.io.mae_import` — facebookresearch/mae and timm weights into a clmae model (``--init-from``).
* :mod:`clmae.io.export` — the encoder for timm or Hugging Face transformers (``clmae export``).
* :mod:`clmae.io.records` — a run's metrics log (JSONL, TensorBoard when installed), read back tolerantly.

This file imports nothing heavy: the command line reads :data:`EXPORT_FORMATS` from it.
"""

EXPORT_FORMATS = ("timm", "hf")  # `clmae export --format`
