"""Images in: the datasets (digits, CIFAR-10, npz, image folders, tar shards), decoding, augmentation, batches.

* :mod:`clmae.data.images` — decoding files robustly, statistics, the per-image transforms.
* :mod:`clmae.data.augment` — random-resized-crop and flip for a whole batch, on the device.
* :mod:`clmae.data.shards` — tar shards: reading them as a stream, writing them from a folder.
* :mod:`clmae.data.datasets` — every ``--data`` as one :class:`~clmae.data.datasets.Dataset` interface.
* :mod:`clmae.data.loader` — this rank's training batches, reproducible per epoch; the DataLoader settings.
"""
