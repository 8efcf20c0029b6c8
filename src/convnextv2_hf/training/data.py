"""Image datasets for the entry points: Hub or local folders, one image decoder, clear errors before training.

Local folders are scanned first (images counted, other files ignored and counted, a stray `metadata.csv` named,
the class layout checked) and the list of image files becomes a `Dataset` directly in Arrow, as `datasets`'
`imagefolder` builder would lay it out.
"""

from __future__ import annotations

import functools
import io
import logging
import os
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import PIL.Image
import PIL.ImageOps
from datasets import Dataset, DatasetDict, Image, IterableDataset, IterableDatasetDict, load_dataset
from datasets.packaged_modules.folder_based_builder.folder_based_builder import FolderBasedBuilder
from datasets.packaged_modules.imagefolder.imagefolder import IMAGE_EXTENSIONS
from huggingface_hub import is_offline_mode

from ..image_processing_convnextv2 import check_aspect_ratio, to_rgb

logger = logging.getLogger(__name__)

IMAGE_COLUMN_CANDIDATES = ("image", "img", "pixel_values", "picture")
LABEL_COLUMN_CANDIDATES = ("label", "labels", "fine_label", "class")
METADATA_FILENAMES = tuple(FolderBasedBuilder.METADATA_FILENAMES)


class UnreadableImageError(ValueError):
    """An image file that cannot be decoded (or is refused by the decompression guard); the message names it."""


# --------------------------------------------------------------------------------------------- local folders


@dataclass
class FolderScan:
    """What a local image folder holds: image files, class names (first-level folders), ignored files."""

    root: Path
    images: list[Path] = field(default_factory=list)
    ignored: list[Path] = field(default_factory=list)
    metadata: list[Path] = field(default_factory=list)
    broken: int = 0  # links to nothing, counted among `ignored`

    @functools.cached_property
    def parts(self) -> list[tuple[str, ...]]:
        """Each image's path parts below `root` (computed once: a million `relative_to` calls take seconds)."""
        prefix = len(self.root.parts)
        return [path.parts[prefix:] for path in self.images]

    @functools.cached_property
    def classes(self) -> list[str]:
        return sorted({parts[0] for parts in self.parts if len(parts) > 1})


def scan_folder(root: str | os.PathLike, flag: str, ignore_metadata: bool = False) -> FolderScan:
    """List the images under `root` (any depth, following symbolic links as torchvision's `ImageFolder` does; names
    starting with "." inside `root` skipped); fail clearly on an empty folder or a metadata file the user did not ask
    for (it would make `imagefolder` read only the files it lists). Broken links are counted with the ignored files."""
    scan = FolderScan(Path(root))
    if not scan.root.is_dir():
        raise FileNotFoundError(f"{flag} {str(root)!r} is not a directory.")
    for path in walk_files(scan.root):
        if not path.exists():
            scan.ignored.append(path)
            scan.broken += 1
        elif path.name in METADATA_FILENAMES:
            scan.metadata.append(path)
        elif path.suffix.lower() in IMAGE_EXTENSIONS:
            scan.images.append(path)
        else:
            scan.ignored.append(path)
    if scan.metadata and not ignore_metadata:
        raise ValueError(f"{flag} holds {scan.metadata[0]}, which would restrict the data set to the files it lists; "
                         "remove it, or pass --ignore_metadata to read the folder as plain images.")
    if not scan.images:
        others = f" ({len(scan.ignored)} other files, e.g. {scan.ignored[0].name})" if scan.ignored else ""
        raise ValueError(f"{flag} {str(root)!r} holds no image files{others}; supported: .png, .jpg, .jpeg, .webp, ...")
    if scan.ignored:
        logger.warning("%s: ignoring %d non-image file(s) (%d broken link(s)), e.g. %s", flag, len(scan.ignored),
                       scan.broken, scan.ignored[0])
    return scan


def walk_files(root: Path) -> list[Path]:
    """Files (and broken links) under `root`, sorted, through linked folders too (each real folder once, so a
    link loop ends); hidden names inside `root` are skipped."""
    found, seen = [], set()
    for folder, subfolders, files in os.walk(root, followlinks=True):
        real = os.path.realpath(folder)
        if real in seen:
            subfolders[:] = []
            continue
        seen.add(real)
        subfolders[:] = [name for name in subfolders if not name.startswith(".")]
        found.extend(Path(folder, name) for name in files if not name.startswith("."))
    return sorted(found)


def check_class_layout(scan: FolderScan, flag: str) -> list[str]:
    """Labelled folders hold one sub-folder per class with the images directly inside; returns the class names."""
    depths = {len(parts) for parts in scan.parts}
    if 1 in depths:
        loose = next(p for p, parts in zip(scan.images, scan.parts) if len(parts) == 1)
        raise ValueError(f"{flag} has images directly inside it (e.g. {loose.name}); labels come from class "
                         "sub-folders: move every image into <folder>/<class name>/.")
    if depths != {2}:
        deep = next(p for p, parts in zip(scan.images, scan.parts) if len(parts) > 2)
        raise ValueError(f"{flag} has images nested below the class folders (e.g. {deep.relative_to(scan.root)}); "
                         "put each image directly inside its class folder.")
    if len(scan.classes) < 2:
        raise ValueError(f"{flag} has only one class folder ({scan.classes}); classification needs at least two.")
    return scan.classes


def check_class_folders(train: FolderScan, validation: FolderScan) -> None:
    """Train and validation folders must have the same classes (else labels would not line up)."""
    if train.classes != validation.classes:
        raise ValueError(
            f"Class mismatch: --train_dir has {len(train.classes)} class folders {train.classes[:10]}, "
            f"--validation_dir has {len(validation.classes)} {validation.classes[:10]}; only in one of them: "
            f"{sorted(set(train.classes) ^ set(validation.classes))[:10]}."
        )


def load_image_dataset(args, labelled: bool = False, streaming: bool = False, token: str | None = None):
    """The dataset named by `args` (a [`DataArguments`]): a Hub dataset, or local folders checked as above.

    Returns `(dataset, ignored)`: the `DatasetDict` and the number of non-image files skipped in local folders.
    """
    if args.dataset_name is None and args.train_dir is None:
        raise ValueError("Pass --dataset_name (a Hub dataset) or --train_dir (a folder of images).")
    if args.dataset_name is not None:
        return load_hub_dataset(args, streaming, token), 0
    scans = {"train": scan_folder(args.train_dir, "--train_dir", args.ignore_metadata)}
    if args.validation_dir is not None:
        scans["validation"] = scan_folder(args.validation_dir, "--validation_dir", args.ignore_metadata)
    if labelled:
        for split, scan in scans.items():
            check_class_layout(scan, f"--{split}_dir")
        if "validation" in scans:
            check_class_folders(scans["train"], scans["validation"])
    splits = {split: folder_dataset(scan, labelled) for split, scan in scans.items()}
    ignored = sum(len(scan.ignored) for scan in scans.values())
    if streaming:
        return IterableDatasetDict({k: v.to_iterable_dataset() for k, v in splits.items()}), ignored
    return DatasetDict(splits), ignored


def folder_dataset(scan: FolderScan, labelled: bool) -> Dataset:
    """A scanned folder as the `Dataset` `load_dataset("imagefolder")` would give (an undecoded `image` column;
    with `labelled`, a `label` from the first-level folder names, sorted), built directly in Arrow: the image
    folder builder resolves and prepares every file one by one, which grows to minutes at ImageNet scale."""
    import pyarrow as pa
    from datasets import ClassLabel, DatasetInfo, Features
    from datasets.table import InMemoryTable

    paths = pa.array([str(path) for path in scan.images], pa.string())
    columns = {"image": pa.StructArray.from_arrays([pa.nulls(len(paths), pa.binary()), paths], names=["bytes", "path"])}
    features = {"image": Image(decode=False)}
    if labelled:
        index = {name: i for i, name in enumerate(scan.classes)}
        columns["label"] = pa.array([index[parts[0]] for parts in scan.parts], pa.int64())
        features["label"] = ClassLabel(names=scan.classes)
    return Dataset(InMemoryTable(pa.table(columns)), info=DatasetInfo(features=Features(features)))


# Folder names that say which split a folder holds, not what data it is (`imagenet/train`).
SPLIT_FOLDER_NAMES = {"train", "training", "val", "valid", "validation", "test", "images", "data"}


def dataset_label(args) -> str:
    """How cards name the data: the hub id, or the image folder's name (its parent's for a split folder)."""
    if args.dataset_name:
        return args.dataset_name
    folder = Path(os.path.abspath(args.train_dir))
    return folder.parent.name if folder.name.lower() in SPLIT_FOLDER_NAMES and folder.parent.name else folder.name


def load_hub_dataset(args, streaming: bool, token: str | None) -> DatasetDict | IterableDatasetDict:
    try:
        return load_dataset(args.dataset_name, args.dataset_config_name, streaming=streaming,
                            cache_dir=getattr(args, "cache_dir", None), token=token)
    except Exception as error:
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


# --------------------------------------------------------------------------------------------- decoding

# PIL's own decompression-bomb limit: it raises above twice its `Image.MAX_IMAGE_PIXELS` (89,478,485). A literal,
# because a user may have set PIL's attribute to None.
MAX_IMAGE_PIXELS = 178_956_970


def open_image_header(record: Any, max_pixels: int = MAX_IMAGE_PIXELS) -> PIL.Image.Image:
    """Open one undecoded image cell (`{'path', 'bytes'}`) lazily, reading only its header; files that are not
    images, or exceed the decompression guard, raise [`UnreadableImageError`] naming their path."""
    path = record.get("path") if isinstance(record, dict) else None
    try:
        if isinstance(record, dict) and record.get("bytes") is not None:
            image = PIL.Image.open(io.BytesIO(record["bytes"]))
        elif path is not None:
            image = PIL.Image.open(path)
        else:
            raise ValueError(f"unsupported image cell of type {type(record).__name__}")
    except Exception as error:
        raise unreadable(path, error) from None
    if image.width * image.height > max_pixels:
        image.close()
        raise UnreadableImageError(
            f"Image {path or '<in-memory bytes>'} is {image.width}x{image.height} px, more than the decompression "
            f"guard allows ({max_pixels} px); shrink it, or raise --max_image_pixels if it is genuine.")
    return image


def decode_image(record: Any, max_pixels: int = MAX_IMAGE_PIXELS) -> PIL.Image.Image:
    """Decode one image cell (a PIL image, or `{'path', 'bytes'}`) to RGB, turned upright by its EXIF orientation
    as transformers' `load_image` (and so its pipeline) does. Unreadable or oversized files name their path."""
    if isinstance(record, PIL.Image.Image):
        return to_rgb(PIL.ImageOps.exif_transpose(record))
    image = open_image_header(record, max_pixels)
    try:
        image.load()
        return to_rgb(PIL.ImageOps.exif_transpose(image))
    except Exception as error:
        raise unreadable(record.get("path"), error) from None


def decode_for_processor(record: Any, max_pixels: int = MAX_IMAGE_PIXELS) -> PIL.Image.Image:
    """[`decode_image`], also refusing (naming the file) what the image processor would refuse at evaluation time:
    an aspect ratio so extreme that resizing its short side would make a huge image."""
    image = decode_image(record, max_pixels)
    try:
        check_aspect_ratio(image.height, image.width)
    except ValueError as error:
        path = record.get("path") if isinstance(record, dict) else None
        raise UnreadableImageError(f"Image {path or '<in-memory image>'}: {error} (or pass --skip_corrupt_images)"
                                   ) from None
    return image


def unreadable(path: str | None, error: Exception) -> UnreadableImageError:
    return UnreadableImageError(
        f"Cannot read image {path or '<in-memory bytes>'}: {error}. Remove the file or pass --skip_corrupt_images.")


def drop_unreadable(dataset: Dataset | IterableDataset, image_column: str, max_pixels: int = MAX_IMAGE_PIXELS,
                    processed: bool = False):
    """Filter out undecodable images (with `processed`, also those the image processor would refuse), naming each
    in a warning; returns (dataset, number dropped, or None when streaming)."""
    decode = decode_for_processor if processed else decode_image

    def readable(row) -> bool:
        try:
            decode(row[image_column], max_pixels)
        except UnreadableImageError as error:
            logger.warning("Skipping: %s", error)
            return False
        return True

    if isinstance(dataset, IterableDataset):
        return dataset.filter(readable), None
    processes = min(os.cpu_count() or 1, 8) if len(dataset) >= 10_000 else None  # decoding is CPU-bound
    kept = dataset.filter(readable, desc="Checking images", load_from_cache_file=False, num_proc=processes)
    return kept, len(dataset) - len(kept)


def check_headers(dataset: Dataset, image_column: str, max_pixels: int = MAX_IMAGE_PIXELS) -> None:
    """Open every image's header (no pixels are decoded), so that files that are not images at all, or far too
    large, are named before training rather than hours into it. Once per machine: see [`checked_once`]."""
    with checked_once(dataset, image_column, f"headers-{max_pixels}") as needed:
        if needed:
            check_in_threads(dataset, image_column, lambda record: open_image_header(record, max_pixels).close(),
                             "Checking image headers")


def check_readable(dataset: Dataset, image_column: str, max_pixels: int = MAX_IMAGE_PIXELS) -> None:
    """Decode every evaluation image once before training, so a file that evaluation (the image processor) cannot
    take fails now, naming it, not after hours of training. Once per machine: see [`checked_once`]."""
    with checked_once(dataset, image_column, f"decoded-{max_pixels}") as needed:
        if needed:
            check_in_threads(dataset, image_column, lambda record: decode_for_processor(record, max_pixels),
                             "Decoding evaluation images")


@contextmanager
def checked_once(dataset: Dataset, image_column: str, check: str):
    """Yields whether `check` must run on these image files: not when it passed before on this machine for the
    same files (paths, sizes and modification times), which other processes of a launch and every resume reuse. A
    marker in the datasets cache records a pass; files given as bytes are always checked."""
    import hashlib

    from datasets import config

    digest = hashlib.sha256(check.encode())
    for batch in dataset.iter(batch_size=4096):
        for record in batch[image_column]:
            path = record.get("path") if isinstance(record, dict) and record.get("bytes") is None else None
            try:
                stat = os.stat(path)
            except (TypeError, OSError):  # bytes (no path), or a file gone since the scan
                stat = None
            if stat is None:  # always checked: the check itself names the file
                yield True
                return
            digest.update(f"{path}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    marker = Path(config.HF_DATASETS_CACHE, "convnextv2_hf", "checked", digest.hexdigest())
    yield not marker.exists()
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.touch()


def check_in_threads(dataset: Dataset, image_column: str, check, description: str) -> None:
    """`check(record)` for every image, over threads (file reads and PIL's decoders release the GIL) and in
    batches (memory stays flat); the first bad file in data order is the one named."""
    from concurrent.futures import ThreadPoolExecutor

    from tqdm.auto import tqdm

    def check_all(records) -> None:
        for record in records:
            check(record)

    threads = min(32, 4 * (os.cpu_count() or 1))
    progress = tqdm(total=len(dataset), desc=description, disable=len(dataset) < 10_000)
    with ThreadPoolExecutor(threads) as pool:
        for batch in dataset.iter(batch_size=threads * 256):
            records = batch[image_column]
            list(pool.map(check_all, [records[i:i + 256] for i in range(0, len(records), 256)]))
            progress.update(len(records))
    progress.close()


def check_not_empty(dataset: Dataset | IterableDataset, split: str) -> None:
    if isinstance(dataset, IterableDataset):
        if next(iter(dataset.take(1)), None) is None:
            raise ValueError(f"The {split} split is empty.")
    elif len(dataset) == 0:
        raise ValueError(f"The {split} split is empty.")
