"""Pretraining: the loop, the parts it is built from, and what watches it.

* :mod:`clmae.train.trainer` — :class:`~clmae.train.trainer.Trainer`: ``fit`` (the run) and ``train_step``
  (one iteration), read top to bottom; :func:`~clmae.train.trainer.pretrain`, the Python API.
* :mod:`clmae.train.build` — one small function per part of a run (config, data, folder, models, optimisers).
* :mod:`clmae.train.steps` — micro-batch windows, the optimiser update, non-finite bookkeeping.
* :mod:`clmae.train.run_folder` — the run folder, resume rules, the checkpoint payload.
* :mod:`clmae.train.callbacks` — the callback interface, the read-only view of a run, the held-out k-NN.
* :mod:`clmae.train.console` — what a run prints: a bar in a terminal, a line per epoch, ETA, summary.
* :mod:`clmae.train.signals` — Ctrl-C and SIGTERM finish the step, save, and exit 130/143.
"""
