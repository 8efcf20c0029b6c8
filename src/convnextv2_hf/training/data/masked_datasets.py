"""Datasets that yield augmented images with their FCMAE masks, every random draw seeded per sample.

A sample's crop, flip and mask come from (seed, epoch, index), and the data order of an epoch from (seed, epoch):
a resumed run, or the same global batch split over several processes, sees exactly the same data.
"""

from __future__ import annotations

import torch
from torch.utils.data import Dataset as TorchDataset, Sampler

from .transforms import sample_generator
from .streams import ResumableStream
from .decoding import (MAX_IMAGE_PIXELS, UnreadableImageError, UnreadableImages, decode_image, open_image_header,
                       stream_image_cell)


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
        return ((self.epoch, i) for i in order.tolist())

    def __len__(self) -> int:
        return self.num_samples


class MaskedRows:
    """The step every masked dataset shares: transform a decoded image and draw its mask, both from the sample's own
    generator. Training images that cannot be decoded are handled by `unreadable` ([`UnreadableImages`])."""

    def __init__(self, dataset, image_column: str, transform, draw_mask, seed: int, max_pixels: int = MAX_IMAGE_PIXELS,
                 skip_unreadable: bool = False):
        self.dataset, self.image_column, self.transform, self.draw_mask = dataset, image_column, transform, draw_mask
        self.seed, self.max_pixels = seed, max_pixels
        sized = hasattr(dataset, "__len__")
        self.unreadable = UnreadableImages(len(dataset) if sized else 0, skip_unreadable, max_pixels)

    def masked_sample(self, image, generator: torch.Generator) -> dict:
        pixel_values = self.transform(image, generator)
        return {"pixel_values": pixel_values, "bool_masked_pos": self.draw_mask(pixel_values, generator)}


class MaskedImageDataset(MaskedRows, TorchDataset):
    """Map-style: `(epoch, index)` -> augmented image and its FCMAE mask, both seeded per sample."""

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key):
        epoch, index = key
        generator = sample_generator(self.seed, epoch, index)
        return self.unreadable.row_and_image(self.dataset, index, self.image_column,
                                             use=lambda image: self.masked_sample(image, generator))[1]


class StreamingMaskedImageDataset(MaskedRows, ResumableStream):
    """Streaming ([`ResumableStream`]): this process's parts of the shards, one per data-loader worker, each row's
    place seeding its crop and mask; a resumed run continues at the row after the last one its checkpoint used."""

    def __init__(self, *args, rank: int = 0, world: int = 1, shard_sizes: list | None = None, **kwargs):
        MaskedRows.__init__(self, *args, **kwargs)
        ResumableStream.__init__(self, self.dataset, self.seed, rank, world, shard_sizes)

    def sample(self, row: dict, generator: torch.Generator, index: int, epoch: int) -> dict | None:
        try:
            return self.masked_sample(open_image_header(stream_image_cell(row, self.image_column), self.max_pixels),
                                      generator)
        except UnreadableImageError as error:
            self.unreadable.met(error)
            return None


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
        image = decode_image(self.dataset[index][self.image_column], self.max_pixels)  # checked before training
        return self.masked_sample(image, sample_generator(self.seed, -1, index))


def collate(examples):
    """Stacks each key of the samples (`stream_position` too, when streaming). FCMAE masks are checked here, on the
    host, and their visible-cell count goes with the batch (`visible_cells_per_image`), so the model never reads
    the mask back from the GPU."""
    batch = {key: torch.stack([e[key] for e in examples]) for key in examples[0]}
    if "bool_masked_pos" in batch:
        count = equal_visible_cells(batch["bool_masked_pos"])
        if count is not None:
            batch["visible_cells_per_image"] = count
    return batch


def equal_visible_cells(masks: torch.Tensor) -> int | None:
    """The visible cells of every (flat or 2-D) bool mask in `masks` when all have as many, with at least one cell
    visible and one masked; otherwise None (the model then checks the masks itself and says what is wrong)."""
    flat = masks.reshape(masks.shape[0], -1)
    visible = (~flat.bool()).sum(1)
    fewest, most = int(visible.min()), int(visible.max())
    return fewest if fewest == most and 0 < fewest < flat.shape[1] else None
