"""Deprecated location, kept for one release: use `convnextv2_hf.training.pretrain`."""

import warnings

from .training.pretrain import *  # noqa: F401,F403
from .training.arguments import parse_config_overrides  # noqa: F401
from .training.checkpoints import find_checkpoint  # noqa: F401

warnings.warn("convnextv2_hf.pretrain moved to convnextv2_hf.training.pretrain; this path goes away in the next release.",
              DeprecationWarning, stacklevel=2)
