"""Fine-tuning data that are streamed, not listed: webdataset or parquet shards (`--train_files`,
`--validation_files`) or a hub dataset with `--streaming`. Labels come from the shards (a `label` ClassLabel, or a
`.cls` index named by the `classes.json` beside them); the length of a pass from the shards' row counts."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch.utils.data import IterableDataset as TorchIterableDataset

from .decoding import (MAX_IMAGE_PIXELS, UnreadableImageError, decode_for_processor, open_image_header,
                       stream_image_cell)
from .shards import expand_shard_patterns, open_shards, shard_class_names, shard_row_counts, sharded_source
from .streams import ResumableStream
from . import sources

logger = logging.getLogger(__name__)


@dataclass
class StreamedSplit:
    """One streamed split: the `datasets` stream, its images (None: unknown), its class names, and its images per
    shard (None: unknown)."""

    stream: object
    rows: int | None
    labels: list[str] | None
    flag: str
    shard_sizes: list[int] | None = None


def streamed_source(data_args, streaming: bool) -> bool:
    """Whether fine-tuning reads a stream: shards, or a hub dataset with --streaming."""
    return sharded_source(data_args) is not None or bool(data_args.dataset_name and streaming)


def open_streamed_splits(data_args, token: str | None) -> dict[str, StreamedSplit]:
    """The train split (and the validation split, where one is given) as streams."""
    if (source := sharded_source(data_args)) is not None:
        splits = {"train": shard_split(*source)}
        if data_args.validation_files:
            splits["validation"] = shard_split(list(data_args.validation_files), "--validation_files")
        return splits
    streams = sources.load_hub_dataset(data_args, streaming=True, token=token)
    return {name: hub_split(streams[name], name, data_args) for name in ("train", "validation") if name in streams}


def shard_split(patterns: list[str], flag: str) -> StreamedSplit:
    builder, files = expand_shard_patterns(patterns, flag)
    stream = open_shards(builder, files, flag)["train"]
    sizes = shard_row_counts(files, builder)
    return StreamedSplit(stream, sum(sizes), shard_class_names(files), flag, sizes)


def hub_split(stream, name: str, data_args) -> StreamedSplit:
    info = getattr(stream, "info", None)
    known = info.splits.get(name) if info is not None and info.splits else None
    return StreamedSplit(stream, known.num_examples if known else None, None, f"--dataset_name {data_args.dataset_name}")


def split_class_names(split: StreamedSplit, label_column: str) -> list[str]:
    """The class names of a labelled stream; shards without labels or names are refused in one line."""
    feature = (split.stream.features or {}).get(label_column)
    if hasattr(feature, "names"):
        return list(feature.names)
    if split.labels:
        return list(split.labels)
    raise ValueError(f"{split.flag}: the label column {label_column!r} holds class indices without class names; put "
                     "the names, in index order, in a classes.json beside the shards (as write-shards does).")


def find_label_column(split: StreamedSplit, wanted: str | None) -> str:
    try:
        return sources.find_column(split.stream, wanted, sources.LABEL_COLUMN_CANDIDATES, "label")
    except ValueError:
        if wanted is not None:
            raise
        raise ValueError(f"{split.flag}: these shards carry no labels (columns {list(split.stream.features or [])}); "
                         "fine-tuning needs them: write the shards from a folder with one sub-folder per class "
                         "(convnextv2-hf write-shards), or name the label column with --label_column_name.") from None


class StreamedLabelledDataset(ResumableStream):
    """Training: labelled rows of this process's parts of the stream, each augmented from (seed, epoch, index),
    going on to the next epoch by itself (the `Trainer` runs one epoch of `max_steps`). Unreadable images are
    handled by `unreadable` ([`UnreadableImages`]: skipped and counted, or named)."""

    endless = True

    def __init__(self, dataset, image_column: str, label_column: str, transform, seed: int, unreadable,
                 rank: int = 0, world: int = 1, max_pixels: int = MAX_IMAGE_PIXELS, shard_sizes: list | None = None):
        super().__init__(dataset, seed, rank, world, shard_sizes)
        self.image_column, self.label_column, self.transform = image_column, label_column, transform
        self.unreadable, self.max_pixels = unreadable, max_pixels

    def sample(self, row: dict, generator: torch.Generator, index: int, epoch: int) -> dict | None:
        try:
            pixels = self.transform(open_image_header(stream_image_cell(row, self.image_column), self.max_pixels),
                                    generator)
        except UnreadableImageError as error:
            self.unreadable.met(error)
            return None
        return {"pixel_values": pixels, "labels": row[self.label_column], "sample_index": index, "epoch": epoch}


class StreamedEvaluationDataset(TorchIterableDataset):
    """Evaluation: each row as the processor sees it (what a pipeline does), decoded in the data-loader workers
    (`datasets` gives each its own shards) and never held in memory; unreadable images skipped and counted with
    `skip`, else named. With `world` processes, process `rank` reads its own part (whole shards where they divide
    evenly, else every `world`-th row; [`StreamedEvaluation`] reduces the parts' sums)."""

    def __init__(self, dataset, image_column: str, label_column: str, processor, skip: bool,
                 max_pixels: int = MAX_IMAGE_PIXELS, rank: int = 0, world: int = 1):
        self.dataset, self.image_column, self.label_column = dataset, image_column, label_column
        self.processor, self.skip, self.max_pixels, self.rank, self.world = processor, skip, max_pixels, rank, world

    def __iter__(self):
        from datasets.distributed import split_dataset_by_node

        rows = split_dataset_by_node(self.dataset, self.rank, self.world) if self.world > 1 else self.dataset
        for row in rows:
            try:
                image = decode_for_processor(stream_image_cell(row, self.image_column), self.max_pixels)
            except UnreadableImageError as error:
                if not self.skip:
                    raise
                logger.warning("Skipping: %s", error)
                continue
            yield {"pixel_values": self.processor(image, return_tensors="pt")["pixel_values"][0],
                   "labels": row[self.label_column]}
