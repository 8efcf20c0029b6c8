"""Image processor for ConvNeXt V2: transformers' ConvNeXt preprocessing plus FCMAE masks."""

from __future__ import annotations

import numpy as np
import PIL.Image
import torch
from transformers.image_processing_utils import BatchFeature
from transformers.models.convnext.image_processing_pil_convnext import (
    ConvNextImageProcessorKwargs,
    ConvNextImageProcessorPil,
)

from .masking import random_masking


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
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        array = np.asarray(image, dtype=np.float64)
        bits = 16 if image.mode.startswith("I;16") or array.max(initial=0) > 255 else 8
        scale = 255.0 / (2**bits - 1) if image.mode != "F" or array.max(initial=0) > 1 else 255.0
        array = np.clip(array * scale, 0, 255).astype(np.uint8)
        return PIL.Image.fromarray(array, mode="L").convert("RGB")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = PIL.Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return PIL.Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def array_to_uint8(array: np.ndarray) -> np.ndarray:
    """Bring integer arrays wider than 8 bits into 0..255, so 16-bit images are not clipped."""
    if array.dtype.kind in "ui" and array.dtype.itemsize > 1:
        peak = 65535 if array.max(initial=0) > 255 else 255
        return (array.astype(np.float64) * (255.0 / peak)).round().astype(np.uint8)
    return array


class ConvNextV2ImageProcessor(ConvNextImageProcessorPil):
    r"""
    Resize, center-crop and normalise as transformers' ConvNeXt processor does, and optionally draw FCMAE masks.

    Accepts PIL images of any mode (L, P, RGBA, CMYK, I;16, ...), NumPy arrays and tensors; every image is
    converted to RGB first. With `return_bool_masked_pos=True` it also returns `bool_masked_pos` of shape
    `(batch, h * w)` for `h x w` mask cells, with exactly `int(h * w * (1 - mask_ratio))` visible cells per image.

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
    do_convert_rgb = True
    return_bool_masked_pos = False
    mask_ratio = 0.6
    mask_cell_size = 32
    mask_seed = None
    model_input_names = ["pixel_values"]

    def process_image(self, image, *args, **kwargs):
        if isinstance(image, PIL.Image.Image):
            image = to_rgb(image)
        elif isinstance(image, torch.Tensor):
            image = array_to_uint8(image.detach().cpu().numpy())
        elif isinstance(image, np.ndarray):
            image = array_to_uint8(image)
        if isinstance(image, np.ndarray) and image.ndim == 2:  # grayscale (H, W)
            image = np.repeat(image[..., None], 3, axis=-1)
        image = super().process_image(image, *args, **kwargs)
        if image.shape[0] == 1:  # grayscale arrays
            image = np.repeat(image, 3, axis=0)
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
                [image.shape[-2:] for image in data["pixel_values"]], mask_ratio, mask_cell_size, mask_seed
            )
        return BatchFeature(data=data, tensor_type=return_tensors)

    @classmethod
    def for_training(cls, source: str | None, image_size: int, mask_cell_size: int, mask_ratio: float | None = None):
        """The processor saved in `source` if there is one, else the defaults; set to `image_size` and the mask cell."""
        import os

        if source and os.path.exists(os.path.join(source, "preprocessor_config.json")):
            processor = cls.from_pretrained(source)
        else:
            processor = cls()
        processor.size = {"shortest_edge": image_size}
        processor.mask_cell_size = mask_cell_size
        if mask_ratio is not None:
            processor.mask_ratio = mask_ratio
        return processor

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


__all__ = ["ConvNextV2ImageProcessor", "to_rgb"]
