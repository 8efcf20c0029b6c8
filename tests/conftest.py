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


def make_image_folder(root, classes=("cats", "dogs"), per_class=6, size_range=(40, 90), corrupt=True, seed=0):
    """A small image folder with mixed modes (RGB, L, P, RGBA, I;16) and sizes, plus one corrupt file."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    modes = ["RGB", "L", "P", "RGBA", "I;16"]
    for c, name in enumerate(classes):
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            w, h = rng.integers(*size_range, size=2)
            base = np.zeros((h, w, 3), dtype=np.uint8)
            base[..., c % 3] = 200  # class colour
            base[rng.integers(0, h // 2):, : rng.integers(w // 3, w)] += rng.integers(0, 55, dtype=np.uint8)
            image = Image.fromarray(base)
            mode = modes[(i + c) % len(modes)]
            if mode == "I;16":
                image = Image.fromarray((np.asarray(image.convert("L"), dtype=np.uint16) * 257))
            else:
                image = image.convert(mode)
            image.save(folder / f"{i}.png")
    if corrupt:
        (root / classes[0] / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nthis is not a png")
    return root
