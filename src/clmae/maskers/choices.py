"""Values of the strategies' options that the configuration and the CLI check without importing torch.

A leaf module: the strategy modules and :mod:`clmae.maskers` (the registry) both read it, so the
package's face stays torch-free without an import cycle.
"""

from __future__ import annotations

ATTMASK_VARIANTS = ("high", "low")  # --attmask-variant: hide the most (AttMask-High) or the least attended patches
