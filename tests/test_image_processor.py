import json

import numpy as np
import pytest
import torch
from PIL import Image

from convnextv2_hf import ConvNextV2ImageProcessor
from convnextv2_hf.image_processing_convnextv2 import to_rgb


def odd_images():
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 255, (50, 70, 3), dtype=np.uint8))
    return [
        rgb,
        rgb.convert("L"),
        rgb.convert("P"),
        rgb.convert("RGBA"),
        rgb.convert("CMYK"),
        Image.fromarray(rng.integers(0, 65535, (45, 33), dtype=np.uint16)),  # mode I;16
        rng.integers(0, 255, (40, 60, 3), dtype=np.uint8),  # numpy HWC
        rng.integers(0, 255, (40, 60), dtype=np.uint8),  # numpy grayscale
        torch.randint(0, 255, (3, 30, 20), dtype=torch.uint8),  # tensor CHW
    ]


def test_any_mode_becomes_a_normalised_rgb_batch():
    processor = ConvNextV2ImageProcessor(size={"shortest_edge": 32})
    batch = processor(odd_images(), return_tensors="pt")
    assert batch["pixel_values"].shape == (9, 3, 32, 32)
    assert torch.isfinite(batch["pixel_values"]).all()


def test_sixteen_bit_images_are_rescaled_not_clipped():
    array = np.full((4, 4), 32768, dtype=np.uint16)
    image = Image.fromarray(array)
    assert image.mode.startswith("I;16")
    assert np.asarray(to_rgb(image))[0, 0, 0] == 127
    transparent = Image.new("RGBA", (2, 2), (0, 0, 0, 0))
    assert np.asarray(to_rgb(transparent))[0, 0].tolist() == [255, 255, 255]


@pytest.mark.parametrize("ratio", [0.3, 0.6, 0.9])
def test_masks_have_exact_visible_count_and_are_seedable(ratio):
    processor = ConvNextV2ImageProcessor(size={"shortest_edge": 64}, mask_cell_size=16, mask_ratio=ratio)
    images = odd_images()[:4]
    a = processor(images, return_bool_masked_pos=True, mask_seed=7, return_tensors="pt")
    b = processor(images, return_bool_masked_pos=True, mask_seed=7, return_tensors="pt")
    assert a["bool_masked_pos"].shape == (4, 16) and a["bool_masked_pos"].dtype == torch.bool
    assert ((~a["bool_masked_pos"]).sum(1) == int(16 * (1 - ratio))).all()
    assert torch.equal(a["bool_masked_pos"], b["bool_masked_pos"])
    assert "bool_masked_pos" not in processor(images, return_tensors="pt")


def test_mask_cell_must_divide_the_processed_size():
    processor = ConvNextV2ImageProcessor(size={"shortest_edge": 40}, mask_cell_size=32)
    with pytest.raises(ValueError, match="multiple of the mask cell"):
        processor(odd_images()[0], return_bool_masked_pos=True)


def test_saved_beside_an_fcmae_model_it_keeps_masks_elsewhere_it_is_native(tmp_path):
    from conftest import tiny_config
    from convnextv2_hf import ConvNextV2ForMaskedImageModeling

    processor = ConvNextV2ImageProcessor(size={"shortest_edge": 64}, mask_ratio=0.75, return_bool_masked_pos=True)
    ConvNextV2ForMaskedImageModeling(tiny_config()).save_pretrained(tmp_path / "fcmae")
    processor.save_pretrained(tmp_path / "fcmae")
    loaded = ConvNextV2ImageProcessor.from_pretrained(tmp_path / "fcmae")
    assert loaded.mask_ratio == 0.75 and loaded.return_bool_masked_pos
    out = loaded(odd_images()[0], return_tensors="pt")
    assert out["bool_masked_pos"].shape == (1, 4)

    processor.save_pretrained(tmp_path / "plain")
    saved = json.loads((tmp_path / "plain" / "preprocessor_config.json").read_text())
    assert saved["image_processor_type"] == "ConvNextImageProcessor" and "auto_map" not in saved
    assert not any(key.startswith("mask") or "masked" in key for key in saved)
    assert not list((tmp_path / "plain").glob("*.py"))


def test_odd_inputs_work_on_the_torchvision_base_too(tmp_path):
    """With torchvision installed the processor builds on transformers' torchvision ConvNeXt processor."""
    from conftest import python_for, run_as_user

    python = python_for("with torchvision")
    code = """
import numpy as np, torch
from PIL import Image
from transformers.models.convnext.image_processing_convnext import ConvNextImageProcessor
from convnextv2_hf import ConvNextV2ImageProcessor
assert issubclass(ConvNextV2ImageProcessor, ConvNextImageProcessor)
rng = np.random.default_rng(0)
rgb = Image.fromarray(rng.integers(0, 255, (50, 70, 3), dtype=np.uint8))
images = [rgb, rgb.convert("L"), rgb.convert("P"), rgb.convert("RGBA"), rgb.convert("CMYK"),
          Image.fromarray(rng.integers(0, 65535, (45, 33), dtype=np.uint16)),
          rng.integers(0, 255, (40, 60, 3), dtype=np.uint8), torch.randint(0, 255, (3, 30, 20), dtype=torch.uint8)]
batch = ConvNextV2ImageProcessor(size={"shortest_edge": 32}, mask_cell_size=16)(
    images, return_bool_masked_pos=True, mask_seed=0, return_tensors="pt")
assert batch["pixel_values"].shape == (8, 3, 32, 32) and torch.isfinite(batch["pixel_values"]).all()
assert batch["bool_masked_pos"].shape == (8, 4) and batch["bool_masked_pos"].dtype == torch.bool
print("ok")
"""
    result = run_as_user([python, "-c", code], tmp_path)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-3000:]


def test_defaults_match_the_model_and_the_reference():
    processor = ConvNextV2ImageProcessor()
    assert processor.size == {"shortest_edge": 224}  # config.image_size, not transformers' ConvNeXt 384
    assert tuple(processor.image_mean) == (0.485, 0.456, 0.406) and tuple(processor.image_std) == (0.229, 0.224, 0.225)
