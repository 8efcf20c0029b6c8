"""Deprecated location, kept for one release: use `convnextv2_hf.training.data`."""

import warnings

from .training.data import *  # noqa: F401,F403
from .training.data import decode_image as open_image  # noqa: F401

warnings.warn("convnextv2_hf.data moved to convnextv2_hf.training.data; this path goes away in the next release.",
              DeprecationWarning, stacklevel=2)
