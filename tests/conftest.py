import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import pytest  # noqa: E402
import torch  # noqa: E402

from convnextv2_hf import ConvNextV2Config  # noqa: E402


def tiny_config(**kwargs) -> ConvNextV2Config:
    """A four-stage model small enough for unit tests; mask cell 16 px with a 2 px stem."""
    defaults = dict(
        depths=[1, 1, 2, 1], hidden_sizes=[8, 16, 24, 32], patch_size=2, decoder_hidden_size=16, num_labels=3
    )
    defaults.update(kwargs)
    return ConvNextV2Config(**defaults)


@pytest.fixture
def config():
    return tiny_config()


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
