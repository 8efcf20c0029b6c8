"""Image datasets for the example scripts: hub or image-folder sources, robust decoding, clear early errors."""

from __future__ import annotations

import io
import os
from typing import Any

import PIL.Image
from datasets import Dataset, DatasetDict, Image, IterableDataset, IterableDatasetDict, load_dataset

from .image_processing_convnextv2 import to_rgb

IMAGE_COLUMN_CANDIDATES = ("image", "img", "pixel_values", "picture")
LABEL_COLUMN_CANDIDATES = ("label", "labels", "fine_label", "class")


class UnreadableImageError(ValueError):
    """An image file that PIL cannot decode; the message names its path."""


def load_image_dataset(
    dataset_name: str | None = None,
    dataset_config_name: str | None = None,
    train_dir: str | None = None,
    validation_dir: str | None = None,
    streaming: bool = False,
    cache_dir: str | None = None,
    token: str | None = None,
) -> DatasetDict | IterableDatasetDict:
    """Load `dataset_name` from the Hub (or its local cache), or image folders through the `imagefolder` builder."""
    if dataset_name is None and train_dir is None:
        raise ValueError("Pass --dataset_name (a Hub dataset) or --train_dir (a folder of images, one sub-folder per class).")
    if dataset_name is not None:
        try:
            return load_dataset(dataset_name, dataset_config_name, streaming=streaming, cache_dir=cache_dir, token=token)
        except Exception as error:
            offline = any(os.environ.get(v, "0").upper() in ("1", "ON", "YES", "TRUE")
                          for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))
            hint = (" HF_HUB_OFFLINE / HF_DATASETS_OFFLINE is set and the dataset is not in the local cache."
                    if offline else " Check the name and your network connection.")
            raise RuntimeError(
                f"Could not load the dataset {dataset_name!r} ({type(error).__name__}: {error}).{hint} To use local "
                "images instead, pass --train_dir (and optionally --validation_dir)."
            ) from None
    for name, folder in (("--train_dir", train_dir), ("--validation_dir", validation_dir)):
        if folder is not None and not os.path.isdir(folder):
            raise FileNotFoundError(f"{name} {folder!r} is not a directory.")
    data_files = {"train": os.path.join(train_dir, "**")}
    if validation_dir is not None:
        data_files["validation"] = os.path.join(validation_dir, "**")
    return load_dataset("imagefolder", data_files=data_files, cache_dir=cache_dir, streaming=streaming)


def check_class_folders(train_dir: str, validation_dir: str) -> None:
    """Train and validation image folders must have the same class sub-folders (else labels would not line up)."""
    def classes(folder):
        return sorted(p.name for p in os.scandir(folder) if p.is_dir() and not p.name.startswith("."))

    train, validation = classes(train_dir), classes(validation_dir)
    if train != validation:
        raise ValueError(
            f"Class mismatch: --train_dir has {len(train)} class folders {train[:10]}, --validation_dir has "
            f"{len(validation)} {validation[:10]}; only in one of them: {sorted(set(train) ^ set(validation))[:10]}."
        )


def find_column(dataset: Dataset | IterableDataset, wanted: str | None, candidates: tuple[str, ...], what: str) -> str:
    """The column to use: `wanted` if given (and present), else the first known candidate; a clear error otherwise."""
    columns = list(dataset.column_names or dataset.features or [])
    if wanted is not None:
        if wanted not in columns:
            raise ValueError(f"--{what}_column_name {wanted!r} not found; the dataset has columns {columns}.")
        return wanted
    for name in candidates:
        if name in columns:
            return name
    raise ValueError(f"No {what} column found among {columns}; pass --{what}_column_name.")


def undecoded(dataset: Dataset | IterableDataset, image_column: str):
    """Keep images as raw bytes/paths so that decoding errors can be caught and attributed to a file."""
    feature = dataset.features[image_column] if dataset.features else None
    if isinstance(feature, Image) and feature.decode:
        return dataset.cast_column(image_column, Image(decode=False))
    return dataset


def open_image(record: Any) -> PIL.Image.Image:
    """Decode one image cell (a PIL image, or `{'path', 'bytes'}`) to RGB; unreadable files name their path."""
    if isinstance(record, PIL.Image.Image):
        return to_rgb(record)
    path = record.get("path") if isinstance(record, dict) else None
    try:
        if isinstance(record, dict) and record.get("bytes") is not None:
            image = PIL.Image.open(io.BytesIO(record["bytes"]))
        elif path is not None:
            image = PIL.Image.open(path)
        else:
            raise ValueError(f"unsupported image cell of type {type(record).__name__}")
        image.load()
        return to_rgb(image)
    except Exception as error:
        raise UnreadableImageError(
            f"Cannot read image {path or '<in-memory bytes>'}: {error}. Remove the file or pass --skip_corrupt_images."
        ) from None


def is_readable(record: Any) -> bool:
    try:
        open_image(record)
    except UnreadableImageError:
        return False
    return True


def drop_unreadable(dataset: Dataset | IterableDataset, image_column: str, num_proc: int | None = None):
    """Filter out undecodable images; returns (dataset, number dropped or None when streaming)."""
    if isinstance(dataset, IterableDataset):
        return dataset.filter(lambda row: is_readable(row[image_column])), None
    kept = dataset.filter(lambda row: is_readable(row[image_column]), num_proc=num_proc, desc="Checking images")
    return kept, len(dataset) - len(kept)


def check_not_empty(dataset: Dataset | IterableDataset, split: str) -> None:
    if isinstance(dataset, IterableDataset):
        if next(iter(dataset.take(1)), None) is None:
            raise ValueError(f"The {split} split is empty.")
    elif len(dataset) == 0:
        raise ValueError(f"The {split} split is empty.")
