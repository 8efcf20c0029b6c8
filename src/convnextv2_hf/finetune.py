"""Deprecated location, kept for one release: use `convnextv2_hf.training.finetune`."""

import warnings

from .training.finetune import *  # noqa: F401,F403

warnings.warn("convnextv2_hf.finetune moved to convnextv2_hf.training.finetune; this path goes away in the next release.",
              DeprecationWarning, stacklevel=2)
