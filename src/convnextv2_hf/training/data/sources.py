"""Where the images of a run come from: local folders, shards or a hub dataset, opened as `datasets`
splits with their image and label columns found, and clear errors before training."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from datasets import Dataset, DatasetDict, Image, IterableDataset, IterableDatasetDict, load_dataset
from huggingface_hub import is_offline_mode

from .cache import refuse_read_only, stream_cache_dir
from .folders import STREAMED_FOLDER_SHARDS, check_class_folders, check_class_layout, folder_dataset, scan_folder
from .per_machine import once_per_machine
from .shards import load_shards, sharded_source

logger = logging.getLogger(__name__)

# The last four: webdataset shards name their columns by file extension.
IMAGE_COLUMN_CANDIDATES = ("image", "img", "pixel_values", "picture", "jpg", "jpeg", "png", "webp")
LABEL_COLUMN_CANDIDATES = ("label", "labels", "fine_label", "class", "cls")  # cls: webdataset's class index


def load_image_dataset(args, labelled: bool = False, streaming: bool = False, token: str | None = None):
    """The dataset named by `args` (a [`DataArguments`]): a Hub dataset, or local folders checked as above.

    Returns `(dataset, ignored)`: the `DatasetDict` and the number of non-image files skipped in local folders.
    """
    if args.dataset_name is None and args.train_dir is None and not getattr(args, "train_files", None):
        raise ValueError("Pass --dataset_name (a Hub dataset), --train_dir (a folder of images or of shards) or "
                         "--train_files (webdataset or parquet shards).")
    if args.dataset_name is not None:
        return load_hub_dataset(args, streaming, token), 0
    if (source := sharded_source(args)) is not None:
        return load_shards(*source), 0
    splits, ignored = once_per_machine(lambda: load_folders(args, labelled))
    if streaming:
        # in shards, so that processes and data-loader workers each read their own part
        return IterableDatasetDict({k: v.to_iterable_dataset(num_shards=min(len(v), STREAMED_FOLDER_SHARDS))
                                    for k, v in splits.items()}), ignored
    return splits, ignored


def load_folders(args, labelled: bool) -> tuple[DatasetDict, int]:
    """`--train_dir` (and `--validation_dir`) listed and checked, as splits; and the number of non-image files."""
    scans = {"train": scan_folder(args.train_dir, "--train_dir", args.ignore_metadata)}
    if args.validation_dir is not None:
        scans["validation"] = scan_folder(args.validation_dir, "--validation_dir", args.ignore_metadata)
    if labelled:
        for split, scan in scans.items():
            check_class_layout(scan, f"--{split}_dir")
        if "validation" in scans:
            check_class_folders(scans["train"], scans["validation"])
    splits = DatasetDict({split: folder_dataset(scan, labelled) for split, scan in scans.items()})
    return splits, sum(len(scan.ignored) for scan in scans.values())


# Folder names that say which split a folder holds, not what data it is (`imagenet/train`).
SPLIT_FOLDER_NAMES = {"train", "training", "val", "valid", "validation", "test", "images", "data"}


def dataset_label(args) -> str:
    """How cards name the data: the hub id, or the image (or shard) folder's name (its parent's for a split
    folder)."""
    if args.dataset_name:
        return args.dataset_name
    files = getattr(args, "train_files", None)
    folder = Path(os.path.abspath(args.train_dir if args.train_dir else os.path.dirname(files[0]) or "."))
    return folder.parent.name if folder.name.lower() in SPLIT_FOLDER_NAMES and folder.parent.name else folder.name


def load_hub_dataset(args, streaming: bool, token: str | None) -> DatasetDict | IterableDatasetDict:
    cache_dir = getattr(args, "cache_dir", None)
    try:
        return load_dataset(args.dataset_name, args.dataset_config_name, streaming=streaming,
                            cache_dir=stream_cache_dir(cache_dir) if streaming else cache_dir, token=token)
    except Exception as error:
        refuse_read_only(error, cache_dir)
        hint = (" HF_HUB_OFFLINE / HF_DATASETS_OFFLINE is set and the dataset is not in the local cache."
                if is_offline_mode() or os.environ.get("HF_DATASETS_OFFLINE", "0").upper() in ("1", "ON", "YES", "TRUE")
                else " Check the name and your network connection.")
        raise RuntimeError(
            f"Could not load the dataset {args.dataset_name!r} ({type(error).__name__}: {error}).{hint} To use local "
            "images instead, pass --train_dir (and optionally --validation_dir)."
        ) from None


# --------------------------------------------------------------------------------------------- columns


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


def label_names(dataset, column: str) -> list[str]:
    feature = dataset.features[column]
    if hasattr(feature, "names"):
        return list(feature.names)
    return [str(v) for v in sorted(set(dataset[column]))]


def undecoded(dataset: Dataset | IterableDataset, image_column: str):
    """Keep images as raw bytes/paths so that decoding errors can be caught and attributed to a file."""
    feature = dataset.features[image_column] if dataset.features else None
    if isinstance(feature, Image) and feature.decode:
        return dataset.cast_column(image_column, Image(decode=False))
    return dataset


def check_not_empty(dataset: Dataset | IterableDataset, split: str) -> None:
    """A stream is not opened here: it is checked as training reads it (opening and closing a parquet stream early
    costs a 5 s wait in `datasets`)."""
    if not isinstance(dataset, IterableDataset) and len(dataset) == 0:
        raise ValueError(f"The {split} split is empty.")
