"""Image processor for ConvNeXt V2: transformers' ConvNeXt preprocessing, any image mode, plus FCMAE masks.

It builds on the ConvNeXt processor that `transformers.AutoImageProcessor` itself picks in this environment (the
torchvision one when torchvision is installed, the PIL one otherwise), so its pixels equal those of a plain
transformers pipeline on the same image.

Model side: shipped inside FCMAE checkpoints, so it imports only numpy, PIL, torch, transformers and its neighbours.
"""

from __future__ import annotations

import json
import os

import numpy as np
import PIL.Image
import torch
from transformers.image_processing_utils import BatchFeature
from transformers.image_utils import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from transformers.models.convnext.image_processing_pil_convnext import (
    ConvNextImageProcessorKwargs,
    ConvNextImageProcessorPil,
)
from transformers.utils import is_torchvision_available, logging

from .masking import random_masking

if is_torchvision_available():  # the same choice AutoImageProcessor makes by default
    from transformers.models.convnext.image_processing_convnext import ConvNextImageProcessor as _ConvNextProcessor
else:
    _ConvNextProcessor = ConvNextImageProcessorPil

logger = logging.get_logger(__name__)

MASK_SETTINGS = ("return_bool_masked_pos", "mask_ratio", "mask_cell_size", "mask_seed")
# Resizing the short side to the target size must not blow an extreme aspect ratio up into a huge image.
MAX_ASPECT_RATIO = 64


class ConvNextV2ImageProcessorKwargs(ConvNextImageProcessorKwargs, total=False):
    r"""
    return_bool_masked_pos (`bool`, *optional*, defaults to `self.return_bool_masked_pos`):
        Also return `bool_masked_pos`, one FCMAE mask per image (`True` = masked).
    mask_ratio (`float`, *optional*, defaults to `self.mask_ratio`):
        Fraction of mask cells to hide.
    mask_cell_size (`int`, *optional*, defaults to `self.mask_cell_size`):
        Side of a mask cell in pixels (the model's total stride, `config.mask_cell_size`).
    mask_seed (`int`, *optional*):
        Seed for the masks of this call, for reproducible masks.
    """

    return_bool_masked_pos: bool
    mask_ratio: float
    mask_cell_size: int
    mask_seed: int


def to_rgb(image: PIL.Image.Image) -> PIL.Image.Image:
    """Convert a PIL image of any mode to 8-bit RGB.

    16-bit and 32-bit modes (`I;16`, `I`, `F`) are rescaled from their value range instead of clipped; images with
    transparency are composited on white.
    """
    if image.mode == "RGB":
        return image
    if image.mode.startswith("I;16"):
        array = np.asarray(image, dtype=np.float64) * (255.0 / 65535)
        return PIL.Image.fromarray(array.astype(np.uint8), mode="L").convert("RGB")
    if image.mode in ("I", "F"):  # 32-bit integers or floats: the same value rules as NumPy arrays
        return PIL.Image.fromarray(array_to_uint8(np.asarray(image)), mode="L").convert("RGB")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = PIL.Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return PIL.Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def array_to_uint8(array: np.ndarray, do_rescale: bool = True) -> np.ndarray:
    """Bring array pixels to 8 bits: 16-bit integers are rescaled (not clipped); floats in [0, 1] are taken as
    already rescaled (`x * 255`, logged once) and floats in [0, 255] as plain values. Anything else is refused."""
    if array.dtype == bool:  # a binary image: False black, True white
        return array.astype(np.uint8) * 255
    if array.dtype == np.uint8 or array.size == 0:
        return array
    low, high = array.min(), array.max()
    if array.dtype.kind in "ui":
        if low < 0 or high > 65535:
            raise ValueError(f"Integer pixel values must lie in 0..255 (8-bit) or 0..65535 (16-bit), got {low}..{high}.")
        peak = 65535 if high > 255 else 255
        return (array.astype(np.float64) * (255.0 / peak)).round().astype(np.uint8)
    if array.dtype.kind != "f" or not do_rescale:
        return array
    if not np.isfinite(array).all() or low < 0 or high > 255:
        raise ValueError(
            f"Float pixel values must lie in [0, 1] (already rescaled) or [0, 255], got {low:.3g}..{high:.3g}; values "
            "outside look normalised already: give the model those directly, or pass do_rescale=False."
        )
    if high <= 1:
        logger.warning_once("Float images with values in [0, 1] are taken as already rescaled (multiplied by 255).")
        array = array * 255.0
    return np.round(array).astype(np.uint8)


def check_normalisation(image_mean, image_std) -> None:
    """`image_mean` and `image_std` must give one finite value per RGB channel (or one for all), std above 0."""
    for name, values in (("image_mean", image_mean), ("image_std", image_std)):
        values = [values] if isinstance(values, (int, float)) else list(values)
        if len(values) not in (1, 3) or not all(isinstance(v, (int, float)) and np.isfinite(v) for v in values):
            raise ValueError(f"`{name}` must be 3 numbers (one per RGB channel), got {values!r}.")
        if name == "image_std" and min(values) <= 0:
            raise ValueError(f"`image_std` must be above 0 (it divides the pixels), got {values!r}.")


def check_aspect_ratio(height: int, width: int) -> None:
    if max(height, width) > MAX_ASPECT_RATIO * max(1, min(height, width)):
        raise ValueError(
            f"Image of {width}x{height} px has an aspect ratio beyond {MAX_ASPECT_RATIO}:1; resizing its short side "
            "to the model's size would create a huge image. Crop or pad it first."
        )


def holds_fcmae_model(folder: str | os.PathLike) -> bool:
    config_file = os.path.join(folder, "config.json")
    if not os.path.isfile(config_file):
        return False
    with open(config_file, encoding="utf-8") as handle:
        return "ConvNextV2ForMaskedImageModeling" in (json.load(handle).get("architectures") or [])


class ConvNextV2ImageProcessor(_ConvNextProcessor):
    r"""
    Resize, center-crop and normalise as transformers' ConvNeXt processor does, and optionally draw FCMAE masks.

    Accepts PIL images of any mode (L, P, RGBA, CMYK, I;16, ...), NumPy arrays and tensors (8- or 16-bit integers,
    or floats in [0, 255] or already rescaled to [0, 1]); every image is converted to RGB first. With
    `return_bool_masked_pos=True` it also returns `bool_masked_pos` of shape `(batch, h * w)` for `h x w` mask
    cells, with exactly `int(h * w * (1 - mask_ratio))` visible cells per image.

    Saved into a folder that holds an FCMAE model it keeps its mask settings and code (`trust_remote_code`);
    anywhere else it is saved as transformers' own ConvNeXt processor, which plain transformers loads natively.

    Example:

    ```python
    >>> from PIL import Image
    >>> from convnextv2_hf import ConvNextV2ImageProcessor
    >>> processor = ConvNextV2ImageProcessor(size={"shortest_edge": 64})
    >>> batch = processor(Image.new("I;16", (80, 70)), return_bool_masked_pos=True, mask_seed=0, return_tensors="pt")
    >>> batch["pixel_values"].shape, batch["bool_masked_pos"].shape
    (torch.Size([1, 3, 64, 64]), torch.Size([1, 4]))
    ```
    """

    valid_kwargs = ConvNextV2ImageProcessorKwargs
    size = {"shortest_edge": 224}
    image_mean = IMAGENET_DEFAULT_MEAN  # the reference's normalisation (its scripts use ImageNet mean and std)
    image_std = IMAGENET_DEFAULT_STD
    do_convert_rgb = True
    return_bool_masked_pos = False
    mask_ratio = 0.6
    mask_cell_size = 32
    mask_seed = None
    model_input_names = ["pixel_values"]

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        check_normalisation(self.image_mean, self.image_std)

    def _prepare_images_structure(self, images, expected_ndims: int = 3):
        """A greyscale (H, W) array or tensor, alone or in a list, is one image: given three equal channels."""
        def widened(image):
            if isinstance(image, (np.ndarray, torch.Tensor)) and image.ndim == 2:
                return image[..., None].repeat(1, 1, 3) if isinstance(image, torch.Tensor) else np.repeat(
                    image[..., None], 3, axis=-1)
            return image

        images = [widened(image) for image in images] if isinstance(images, (list, tuple)) else widened(images)
        return super()._prepare_images_structure(images, expected_ndims=expected_ndims)

    def process_image(self, image, *args, do_rescale: bool | None = None, **kwargs):
        if isinstance(image, PIL.Image.Image):
            check_aspect_ratio(image.height, image.width)
            image = to_rgb(image)
        elif isinstance(image, (torch.Tensor, np.ndarray)):
            array = image.detach().cpu().numpy() if isinstance(image, torch.Tensor) else image
            image = array_to_uint8(array, self.do_rescale if do_rescale is None else do_rescale)
        image = super().process_image(image, *args, do_rescale=do_rescale, **kwargs)
        check_aspect_ratio(*image.shape[-2:])
        if image.shape[0] == 1:  # grayscale arrays
            image = image[[0, 0, 0]]
        elif image.shape[0] == 4:  # RGBA arrays: drop alpha
            image = image[:3]
        return image

    def _preprocess(
        self,
        images,
        *args,
        return_bool_masked_pos: bool = False,
        mask_ratio: float = 0.6,
        mask_cell_size: int = 32,
        mask_seed: int | None = None,
        return_tensors=None,
        **kwargs,
    ) -> BatchFeature:
        features = super()._preprocess(images, *args, return_tensors=None, **kwargs)
        data = dict(features)
        if return_bool_masked_pos:
            data["bool_masked_pos"] = self.draw_masks(
                [tuple(image.shape[-2:]) for image in data["pixel_values"]], mask_ratio, mask_cell_size, mask_seed
            )
        return BatchFeature(data=data, tensor_type=return_tensors)

    @staticmethod
    def draw_masks(
        image_sizes: list[tuple[int, int]], mask_ratio: float, mask_cell_size: int, mask_seed: int | None = None
    ) -> list[np.ndarray]:
        """One flat bool mask per image size; sizes must be multiples of `mask_cell_size`."""
        generator = torch.Generator().manual_seed(mask_seed) if mask_seed is not None else None
        masks = []
        for height, width in image_sizes:
            if height % mask_cell_size or width % mask_cell_size:
                raise ValueError(
                    f"Processed images are {height}x{width} px, not a multiple of the mask cell "
                    f"({mask_cell_size} px); choose `size`/`crop_size` accordingly."
                )
            grid = (height // mask_cell_size, width // mask_cell_size)
            masks.append(random_masking(1, grid, mask_ratio, generator=generator)[0].numpy())
        return masks

    def native_processor(self) -> ConvNextImageProcessorPil:
        """The same preprocessing as transformers' own ConvNeXt processor (no mask settings)."""
        keys = ConvNextImageProcessorKwargs.__optional_keys__ | ConvNextImageProcessorKwargs.__required_keys__
        settings = {key: value for key, value in self.to_dict().items() if key in keys}
        return ConvNextImageProcessorPil(**settings)

    def save_pretrained(self, save_directory, *args, **kwargs):
        """Beside an FCMAE model: this processor with its code; anywhere else: transformers' ConvNeXt processor."""
        if holds_fcmae_model(save_directory):
            return super().save_pretrained(save_directory, *args, **kwargs)
        return self.native_processor().save_pretrained(save_directory, *args, **kwargs)


__all__ = ["ConvNextV2ImageProcessor", "to_rgb"]
