"""Training-time image transforms on PIL images, without torchvision.

Randomness comes from an explicit `torch.Generator`, so a pipeline can seed every sample from (seed, epoch, index):
augmentations then do not depend on the order in which processes or resumed runs visit the data.
"""

from __future__ import annotations

import math

import numpy as np
import PIL.Image
import torch
from torch.utils.data import Dataset as TorchDataset

from .decoding import load_image, oriented_size


def sample_generator(seed: int, epoch: int, index: int) -> torch.Generator:
    """A generator seeded from (seed, epoch, sample index)."""
    return torch.Generator().manual_seed((seed * 1_000_003 + epoch * 10_007 + index) % (2**63 - 1))


def random_resized_crop_box(
    width: int, height: int, generator: torch.Generator, scale=(0.2, 1.0), ratio=(3 / 4, 4 / 3)
) -> tuple[int, int, int, int]:
    """(left, top, crop_width, crop_height) as torchvision's RandomResizedCrop samples it: 10 tries, then center."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * (scale[0] + (scale[1] - scale[0]) * torch.rand(1, generator=generator).item())
        aspect = math.exp(log_ratio[0] + (log_ratio[1] - log_ratio[0]) * torch.rand(1, generator=generator).item())
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, (1,), generator=generator))
            left = int(torch.randint(0, width - w + 1, (1,), generator=generator))
            return left, top, w, h
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        w, h = int(round(height * ratio[1])), height
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


def normalize_pixels(pixels: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """uint8 pixels (..., 3, H, W) to the model's input in float32: /255, minus the mean, over the std (both shaped
    (3, 1, 1)). A loader's worker and the training process on its GPU compute the same values, bit for bit."""
    return pixels.float().div_(255.0).sub_(mean).div_(std)  # in place: the same values, fewer copies


class PretrainTransform:
    """FCMAE augmentation: RandomResizedCrop(size, scale) + horizontal flip, then normalisation to a tensor; with
    `uint8=True` the crop's uint8 pixels, for the training process to normalise on its device (a quarter of the
    bytes through shared memory and the host-to-device copy)."""

    def __init__(self, size: int, mean, std, scale=(0.2, 1.0), hflip: bool = True, uint8: bool = False):
        self.size, self.scale, self.hflip, self.uint8 = size, tuple(scale), hflip, uint8
        self.mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)

    def __call__(self, image: PIL.Image.Image, generator: torch.Generator) -> torch.Tensor:
        pixels = self.pixels(self.crop_and_flip(image, generator))
        return pixels if self.uint8 else normalize_pixels(pixels, self.mean, self.std)

    def crop_and_flip(self, image: PIL.Image.Image, generator: torch.Generator) -> PIL.Image.Image:
        """The crop box is drawn on the upright image's full size; an image not yet decoded (opened by
        `open_image_header`) is then decoded only as large as the box needs (a JPEG at 1/2-1/8 scale when the box
        is 2-8 times the output) and the same box, scaled, is cut from it."""
        width, height = oriented_size(image)
        left, top, w, h = random_resized_crop_box(width, height, generator, self.scale)
        image = load_image(image, reduce=min(w, h) / self.size)  # no-op decoding for a decoded image
        sx, sy = image.width / width, image.height / height
        image = image.resize((self.size, self.size), PIL.Image.BICUBIC,
                             box=(left * sx, top * sy, (left + w) * sx, (top + h) * sy))
        if self.hflip and torch.rand(1, generator=generator).item() < 0.5:
            image = image.transpose(PIL.Image.FLIP_LEFT_RIGHT)
        return image

    @staticmethod
    def pixels(image: PIL.Image.Image) -> torch.Tensor:
        """An RGB image as a uint8 (3, H, W) tensor."""
        return torch.from_numpy(np.array(image)).permute(2, 0, 1)

    def normalize(self, image: PIL.Image.Image) -> torch.Tensor:
        return normalize_pixels(self.pixels(image), self.mean, self.std)


class FinetuneTransform(PretrainTransform):
    """The reference fine-tuning's training transform: RandomResizedCrop + flip, RandAugment (or colour jitter when
    RandAugment is off), normalisation, random erasing; all drawn from the sample's generator."""

    def __init__(self, size: int, mean, std, scale=(0.08, 1.0), rand_augment=None, color_jitter=None, erasing=None):
        super().__init__(size, mean, std, scale)
        self.rand_augment, self.color_jitter, self.erasing = rand_augment, color_jitter, erasing

    @classmethod
    def from_recipe(cls, size: int, mean, std, recipe) -> "FinetuneTransform":
        """From [`FinetuningArguments`]: `aa`, `color_jitter`, `reprob`, `remode`, `recount`, `crop_min_scale`."""
        from .rand_augment import ColorJitter, RandAugment, RandomErasing, mean_fill

        rand_augment = RandAugment.from_config(recipe.aa, mean_fill(mean)) if recipe.aa != "none" else None
        jitter = ColorJitter(recipe.color_jitter) if rand_augment is None and recipe.color_jitter else None
        erasing = RandomErasing(recipe.reprob, recipe.remode, recipe.recount) if recipe.reprob > 0 else None
        return cls(size, mean, std, (recipe.crop_min_scale, 1.0), rand_augment, jitter, erasing)

    def __call__(self, image: PIL.Image.Image, generator: torch.Generator) -> torch.Tensor:
        image = self.crop_and_flip(image, generator)
        if self.rand_augment is not None:
            image = self.rand_augment(image, generator)
        elif self.color_jitter is not None:
            image = self.color_jitter(image, generator)
        pixels = self.normalize(image)
        return self.erasing(pixels, generator) if self.erasing is not None else pixels


def denormalize(pixel_values: torch.Tensor, mean, std) -> torch.Tensor:
    """Undo the normalisation of `(N, 3, H, W)` images and clamp to [0, 1], for display."""
    mean = torch.tensor(mean, dtype=pixel_values.dtype).view(1, 3, 1, 1)
    std = torch.tensor(std, dtype=pixel_values.dtype).view(1, 3, 1, 1)
    return (pixel_values * std + mean).clamp(0, 1)


class SeededAugmentedDataset(TorchDataset):
    """Labelled images for fine-tuning, each augmented with randomness seeded from (seed, epoch, index), so a resumed
    run sees the same crops and flips as an uninterrupted one. `set_epoch` is called as each epoch starts. Images
    that cannot be decoded are handled by `unreadable` (an [`UnreadableImages`]); a stand-in brings its label."""

    def __init__(self, dataset, image_column: str, label_column: str, transform, seed: int, unreadable):
        self.dataset, self.image_column, self.label_column = dataset, image_column, label_column
        self.transform, self.seed, self.unreadable = transform, seed, unreadable
        # in memory shared with the data-loader workers, so persistent workers see each new epoch
        self._epoch = torch.zeros((), dtype=torch.int64).share_memory_()

    @property
    def epoch(self) -> int:
        return int(self._epoch)

    def set_epoch(self, epoch: int) -> None:
        self._epoch.fill_(epoch)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict:
        generator = sample_generator(self.seed, self.epoch, index)
        row, pixels = self.unreadable.row_and_image(self.dataset, index, self.image_column,
                                                    use=lambda image: self.transform(image, generator))
        return {"pixel_values": pixels, "labels": row[self.label_column], "sample_index": index, "epoch": self.epoch}
