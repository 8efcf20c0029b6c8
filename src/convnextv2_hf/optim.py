"""Deprecated location, kept for one release: use `convnextv2_hf.training.optim`."""

import warnings

from .training.optim import *  # noqa: F401,F403

warnings.warn("convnextv2_hf.optim moved to convnextv2_hf.training.optim; this path goes away in the next release.",
              DeprecationWarning, stacklevel=2)
