"""Datasets that yield augmented images with their FCMAE masks, every random draw seeded per sample.

A sample's crop, flip and mask come from (seed, epoch, index), and the data order of an epoch from (seed, epoch):
a resumed run, or the same global batch split over several processes, sees exactly the same data.
"""

from __future__ import annotations

import torch
from torch.utils.data import Dataset as TorchDataset, IterableDataset as TorchIterableDataset, Sampler

from .augmentation import sample_generator
from .data import MAX_IMAGE_PIXELS, decode_image


class EpochSampler(Sampler):
    """Yields `(epoch, index)` in an order shuffled from (seed, epoch); `set_epoch` moves to the next epoch."""

    def __init__(self, num_samples: int, seed: int, shuffle: bool = True):
        self.num_samples, self.seed, self.shuffle, self.epoch = num_samples, seed, shuffle, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        if self.shuffle:
            order = torch.randperm(self.num_samples, generator=torch.Generator().manual_seed(self.seed + self.epoch))
        else:
            order = torch.arange(self.num_samples)
        return iter([(self.epoch, int(i)) for i in order])

    def __len__(self) -> int:
        return self.num_samples


class MaskedRows:
    """The step every masked dataset shares: decode a row's image, transform it and draw its mask, both from the
    sample's own generator."""

    def __init__(self, dataset, image_column: str, transform, draw_mask, seed: int, max_pixels: int = MAX_IMAGE_PIXELS):
        self.dataset, self.image_column, self.transform, self.draw_mask = dataset, image_column, transform, draw_mask
        self.seed, self.max_pixels = seed, max_pixels

    def masked_sample(self, row, generator: torch.Generator) -> dict:
        pixel_values = self.transform(decode_image(row[self.image_column], self.max_pixels), generator)
        return {"pixel_values": pixel_values, "bool_masked_pos": self.draw_mask(pixel_values, generator)}


class MaskedImageDataset(MaskedRows, TorchDataset):
    """Map-style: `(epoch, index)` -> augmented image and its FCMAE mask, both seeded per sample."""

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key):
        epoch, index = key
        return self.masked_sample(self.dataset[index], sample_generator(self.seed, epoch, index))


class StreamingMaskedImageDataset(MaskedRows, TorchIterableDataset):
    """Streaming: the running position in the stream plays the role of the index."""

    epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        stream = self.dataset.shuffle(seed=self.seed + self.epoch, buffer_size=1000)
        for position, row in enumerate(stream):
            yield self.masked_sample(row, sample_generator(self.seed, self.epoch, position))


class ProcessorView:
    """The processor's evaluation view (resize, center crop, normalise) as a transform; it draws nothing."""

    def __init__(self, processor):
        self.processor = processor

    def __call__(self, image, generator: torch.Generator) -> torch.Tensor:
        return self.processor(image, return_tensors="pt")["pixel_values"][0]


class EvaluationMaskedDataset(MaskedRows, TorchDataset):
    """Validation: center-cropped images (the processor's eval view) with one fixed mask per index."""

    def __init__(self, dataset, image_column: str, processor, draw_mask, seed: int, max_pixels: int = MAX_IMAGE_PIXELS):
        super().__init__(dataset, image_column, ProcessorView(processor), draw_mask, seed, max_pixels)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        return self.masked_sample(self.dataset[index], sample_generator(self.seed, -1, index))


def collate(examples):
    return {
        "pixel_values": torch.stack([e["pixel_values"] for e in examples]),
        "bool_masked_pos": torch.stack([e["bool_masked_pos"] for e in examples]),
    }
