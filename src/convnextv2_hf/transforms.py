"""Deprecated location, kept for one release: use `convnextv2_hf.training.augmentation`."""

import warnings

from .training.augmentation import *  # noqa: F401,F403

warnings.warn("convnextv2_hf.transforms moved to convnextv2_hf.training.augmentation; this path goes away in the next release.",
              DeprecationWarning, stacklevel=2)
