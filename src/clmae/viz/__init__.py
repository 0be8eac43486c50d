"""Seeing what the masks do: pictures of masks and reconstructions, the curriculum probe, the HTML report.

* :mod:`clmae.viz.pictures` — masks, scores and images as pictures (tensors and matplotlib grids).
* :mod:`clmae.viz.visualize` — ``clmae visualize``: a checkpoint's masks and reconstructions as one PNG grid.
* :mod:`clmae.viz.probe` — the curriculum probe, a training callback: how hard the strategy's masks
  are on a fixed batch, and snapshots of them over training.
* :mod:`clmae.viz.report` — ``clmae report``: one self-contained HTML page of a run.

This file imports nothing heavy: the command line reads :data:`VISUALIZE_MAX_IMAGES` from it.
"""

VISUALIZE_MAX_IMAGES = 64  # rows of a `clmae visualize` grid
