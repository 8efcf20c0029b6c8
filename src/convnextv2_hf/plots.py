"""Deprecated location, kept for one release: use `convnextv2_hf.training.reporting`."""

import warnings

from .training.reporting import *  # noqa: F401,F403

warnings.warn("convnextv2_hf.plots moved to convnextv2_hf.training.reporting; this path goes away in the next release.",
              DeprecationWarning, stacklevel=2)
