"""Evaluating an encoder honestly: every protocol beside a random-init encoder of the same shape.

* :mod:`clmae.evaluation.options` — what every protocol shares and each one's hyper-parameters (no torch).
* :mod:`clmae.evaluation.splits` — the labeled splits and their evaluation view.
* :mod:`clmae.evaluation.features` — feature extraction and its on-disk cache.
* :mod:`clmae.evaluation.protocols` — k-NN, linear probe, few-shot: pure functions on feature tensors.
* :mod:`clmae.evaluation.finetune` — full fine-tuning with layer-wise lr decay.
* :mod:`clmae.evaluation.runner` — ``evaluate`` / ``evaluate_all``: a checkpoint in, reports out.
* :mod:`clmae.evaluation.results` — the report JSON and its summary table.
* :mod:`clmae.evaluation.compare` — several reports as one table and chart, refused when set up differently.
"""
