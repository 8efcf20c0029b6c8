"""Image datasets for the entry points: Hub or local folders, one image decoder, clear errors before training.

Local folders are scanned first (images counted, other files ignored and counted, a stray `metadata.csv` named,
the class layout checked) and the list of image files becomes a `Dataset` directly in Arrow, as `datasets`'
`imagefolder` builder would lay it out.
"""

from __future__ import annotations

import functools
import io
import logging
import math
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
from .per_machine import once_per_machine
from .shards import load_shards, sharded_source

logger = logging.getLogger(__name__)

# The last four: webdataset shards name their columns by file extension.
IMAGE_COLUMN_CANDIDATES = ("image", "img", "pixel_values", "picture", "jpg", "jpeg", "png", "webp")
LABEL_COLUMN_CANDIDATES = ("label", "labels", "fine_label", "class")
METADATA_FILENAMES = tuple(FolderBasedBuilder.METADATA_FILENAMES)


class UnreadableImageError(ValueError):
    """An image file that cannot be decoded (or is refused by the decompression guard); the message names it."""


# --------------------------------------------------------------------------------------------- local folders


@dataclass
class FolderScan:
    """What a local image folder holds, folder by folder: image file names (sorted) under each folder's path parts
    below `root` (the first part is the class), ignored files, metadata files. The names of each folder are one
    Arrow array, not a Python object per file: a million `Path`s take seconds to build and sort and hundreds of MB
    to hold."""

    root: Path
    folders: list[tuple[tuple[str, ...], Any]] = field(default_factory=list)  # (parts, pyarrow string array)
    ignored: list[str] = field(default_factory=list)
    metadata: list[str] = field(default_factory=list)
    broken: int = 0  # links to nothing, counted among `ignored` (as are pipes, sockets and devices)

    def __len__(self) -> int:
        return sum(len(names) for _, names in self.folders)

    @functools.cached_property
    def classes(self) -> list[str]:
        return sorted({parts[0] for parts, _ in self.folders if parts})

    def path_chunks(self) -> list:
        """Every image's path, one Arrow array per folder, in folder order then name order (as sorting the full paths
        part by part would), joined in Arrow."""
        import pyarrow.compute as pc

        return [pc.binary_join_element_wise(os.path.join(self.root, *parts, ""), names, "")
                for parts, names in self.folders]

    def paths(self) -> list[str]:
        return [path for chunk in self.path_chunks() for path in chunk.to_pylist()]

    def example(self, depth_test) -> str:
        """The first image whose folder depth passes `depth_test`, relative to `root` (for error messages)."""
        parts, names = next((parts, names) for parts, names in self.folders if depth_test(len(parts)))
        return os.path.join(*parts, names[0].as_py())


def scan_folder(root: str | os.PathLike, flag: str, ignore_metadata: bool = False) -> FolderScan:
    """List the images under `root` (any depth, following symbolic links as torchvision's `ImageFolder` does; names
    starting with "." inside `root` skipped); fail clearly on an empty folder or a metadata file the user did not ask
    for (it would make `imagefolder` read only the files it lists). Broken links are counted with the ignored files."""
    import pyarrow as pa

    scan = FolderScan(Path(root))
    if not scan.root.is_dir():
        raise FileNotFoundError(f"{flag} {str(root)!r} is not a directory.")
    for parts, files, links in walk_folders(scan.root):
        images = [name for name in files if is_image_name(name)]
        if links or len(images) < len(files):  # the rare files: named with their full path, links checked
            images = sort_out_odd_files(scan, parts, files, links)
        if images:
            scan.folders.append((parts, pa.array(images, pa.string())))
    if scan.metadata and not ignore_metadata:
        raise ValueError(f"{flag} holds {scan.metadata[0]}, which would restrict the data set to the files it lists; "
                         "remove it, or pass --ignore_metadata to read the folder as plain images.")
    if not scan.folders:
        others = f" ({len(scan.ignored)} other files, e.g. {Path(scan.ignored[0]).name})" if scan.ignored else ""
        raise ValueError(f"{flag} {str(root)!r} holds no image files{others}; supported: .png, .jpg, .jpeg, .webp, ...")
    if scan.ignored:
        logger.warning("%s: ignoring %d non-image file(s) (%d broken link(s)), e.g. %s", flag, len(scan.ignored),
                       scan.broken, scan.ignored[0])
    return scan


IMAGE_SUFFIXES = {extension.lstrip(".") for extension in IMAGE_EXTENSIONS}


def is_image_name(name: str) -> bool:
    """Whether a file name has an image extension (as `os.path.splitext` reads it: a stem, then `.ext`)."""
    stem, _, suffix = name.rpartition(".")
    return bool(stem) and suffix.lower() in IMAGE_SUFFIXES


def sort_out_odd_files(scan: FolderScan, parts: tuple[str, ...], files: list[str], links: set[str]) -> list[str]:
    """The images of one folder that also holds links or other files: broken links, non-regular files (a named pipe
    would block its reader forever) and non-image files are counted as ignored, metadata files noted."""
    images = []
    for name in files:
        path = os.path.join(scan.root, *parts, name)
        if name in links and not os.path.isfile(path):  # a broken link, or a pipe, socket or device: never opened
            scan.ignored.append(path)
            scan.broken += not os.path.exists(path)
        elif name in METADATA_FILENAMES:
            scan.metadata.append(path)
        elif is_image_name(name):
            images.append(name)
        else:
            scan.ignored.append(path)
    return images


def walk_folders(root: Path, parts: tuple[str, ...] = (), seen: set | None = None):
    """Yields `(folder parts below root, sorted file names, names that are links or not regular files)` for every
    folder under `root`, in the order of sorted parts (depth first, sub-folders sorted), through linked folders too
    (each real folder once, so a link loop ends); hidden names inside `root` are skipped. One `scandir` per folder,
    no per-file system call except for links, and one folder's names held at a time."""
    seen = set() if seen is None else seen
    real = os.path.realpath(os.path.join(root, *parts))
    if real in seen:
        return
    seen.add(real)
    files, links, subfolders = [], set(), []
    with os.scandir(real) as entries:
        for entry in entries:
            if entry.name.startswith("."):
                continue
            if entry.is_dir():
                subfolders.append(entry.name)
            else:
                files.append(entry.name)
                if entry.is_symlink() or not entry.is_file():  # links and special files are checked one by one
                    links.add(entry.name)
    yield parts, sorted(files), links
    for name in sorted(subfolders):
        yield from walk_folders(root, (*parts, name), seen)


def check_class_layout(scan: FolderScan, flag: str) -> list[str]:
    """Labelled folders hold one sub-folder per class with the images directly inside; returns the class names."""
    depths = {len(parts) for parts, _ in scan.folders}
    if 0 in depths:
        raise ValueError(f"{flag} has images directly inside it (e.g. {scan.example(lambda d: d == 0)}); labels come "
                         "from class sub-folders: move every image into <folder>/<class name>/.")
    if depths != {1}:
        raise ValueError(f"{flag} has images nested below the class folders (e.g. {scan.example(lambda d: d > 1)}); "
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


STREAMED_FOLDER_SHARDS = 1024


def folder_dataset(scan: FolderScan, labelled: bool) -> Dataset:
    """A scanned folder as the `Dataset` `load_dataset("imagefolder")` would give (an undecoded `image` column;
    with `labelled`, a `label` from the first-level folder names, sorted), built directly in Arrow, one chunk per
    folder (never a Python object per file, never a second copy): the image folder builder resolves and prepares
    every file one by one, which grows to minutes at ImageNet scale."""
    import pyarrow as pa
    from datasets import ClassLabel, DatasetInfo, Features
    from datasets.fingerprint import generate_random_fingerprint
    from datasets.table import InMemoryTable

    images = pa.chunked_array([pa.StructArray.from_arrays([pa.nulls(len(paths), pa.binary()), paths],
                                                          names=["bytes", "path"]) for paths in scan.path_chunks()])
    columns, features = {"image": images}, {"image": Image(decode=False)}
    if labelled:
        index = {name: i for i, name in enumerate(scan.classes)}
        columns["label"] = pa.chunked_array([pa.repeat(pa.scalar(index[parts[0]], pa.int64()), len(names))
                                             for parts, names in scan.folders], pa.int64())
        features["label"] = ClassLabel(names=scan.classes)
    # A fingerprint given, not computed: datasets would hash the whole table (a second copy of it in memory).
    return Dataset(InMemoryTable(pa.table(columns)), info=DatasetInfo(features=Features(features)),
                   fingerprint=generate_random_fingerprint())


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
    images, or exceed the decompression guard, raise [`UnreadableImageError`] naming their path (kept as the
    image's `source` for errors met when it is decoded)."""
    if isinstance(record, PIL.Image.Image):
        return record
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
    image.source = path
    return image


def decode_image(record: Any, max_pixels: int = MAX_IMAGE_PIXELS) -> PIL.Image.Image:
    """Decode one image cell (a PIL image, or `{'path', 'bytes'}`) to RGB, turned upright by its EXIF orientation
    as transformers' `load_image` (and so its pipeline) does. Unreadable or oversized files name their path."""
    return load_image(open_image_header(record, max_pixels))


def load_image(image: PIL.Image.Image, reduce: float = 1.0) -> PIL.Image.Image:
    """Decode an image opened by [`open_image_header`] to upright RGB. With `reduce` >= 2, a JPEG may be decoded
    at 1/2, 1/4 or 1/8 scale (PIL's `draft`: the DCT does the shrinking, several times faster), never below
    1/`reduce` of its size; callers map their crop boxes by the size they get. Decoding errors name the file."""
    try:
        if reduce >= 2 and image.format == "JPEG":
            image.draft(None, (math.ceil(image.width / reduce), math.ceil(image.height / reduce)))
        image.load()
        if image.getexif().get(EXIF_ORIENTATION, 1) != 1:  # else exif_transpose would only copy it
            image = PIL.ImageOps.exif_transpose(image)
        return to_rgb(image)
    except Exception as error:
        raise unreadable(getattr(image, "source", None), error) from None


def oriented_size(image: PIL.Image.Image) -> tuple[int, int]:
    """(width, height) of the image once turned upright by its EXIF orientation, read without decoding it."""
    transposed = image.getexif().get(EXIF_ORIENTATION, 1) in (5, 6, 7, 8)
    return (image.height, image.width) if transposed else (image.width, image.height)


EXIF_ORIENTATION = 0x0112


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


STREAM_SLOTS = 1024  # data-loader workers of one process whose stream skips are counted apart


class UnreadableImages:
    """What training does with an image it cannot decode. With `skip`, the next readable image of the data set
    stands in for it (batches keep their shape, the sample its seeded augmentation) and the file is flagged, once,
    in memory shared with the data-loader workers (one byte per image); without, the error names the file and the
    fix. No pass over the data before training: a bad file costs only when it is met."""

    def __init__(self, size: int, skip: bool, max_pixels: int = MAX_IMAGE_PIXELS):
        import torch

        self.skip, self.max_pixels = skip, max_pixels
        self.flags = torch.zeros(size, dtype=torch.uint8).share_memory_() if skip and size else None
        # a stream has no index to flag: each skip is counted, in its worker's own slot (no lost increments)
        self.stream_skips = torch.zeros(STREAM_SLOTS, dtype=torch.int64).share_memory_() if skip and not size else None

    def row_and_image(self, dataset, index: int, image_column: str, use=load_image) -> tuple[dict, Any]:
        """`dataset[index]` and `use(image)` of its image opened lazily (header read; `use` decodes it, by default
        fully), or (with `skip`) those of the next readable row."""
        for offset in range(len(dataset)):
            current = (index + offset) % len(dataset)
            row = dataset[current]
            try:
                return row, use(open_image_header(row[image_column], self.max_pixels))
            except UnreadableImageError as error:
                self.met(error, current)
        raise UnreadableImageError(f"None of the {len(dataset)} training images can be read.")

    def met(self, error: UnreadableImageError, index: int | None = None) -> None:
        """An unreadable image met in training: raise `error` without `skip`; else log it, the first time for a
        data set's `index` (a stream has no index: every time)."""
        if not self.skip:
            raise error
        if index is not None and self.flags is not None:
            if self.flags[index]:
                return
            self.flags[index] = 1
        elif self.stream_skips is not None:
            from torch.utils.data import get_worker_info

            worker = get_worker_info()
            self.stream_skips[(0 if worker is None else worker.id + 1) % STREAM_SLOTS] += 1
        logger.warning("Skipping: %s", error)

    def count(self, accelerator=None) -> int | None:
        """Unreadable images met so far (over all processes, with an `accelerator`); None without `skip`. A stream
        counts each time one was met (once per pass over the data)."""
        if self.flags is not None:
            flags = self.flags if accelerator is None else accelerator.reduce(self.flags.to(accelerator.device).int(),
                                                                              "sum")
            return int((flags > 0).sum())
        if self.stream_skips is not None:
            skips = self.stream_skips.sum().reshape(1)
            return int(skips if accelerator is None else accelerator.reduce(skips.to(accelerator.device), "sum"))
        return None


def drop_unreadable(dataset: Dataset, image_column: str, max_pixels: int = MAX_IMAGE_PIXELS) -> tuple[Dataset, int]:
    """Filter out the images that cannot be decoded or that the image processor would refuse, naming each in a
    warning; returns (dataset, number dropped)."""

    def readable(row) -> bool:
        try:
            decode_for_processor(row[image_column], max_pixels)
        except UnreadableImageError as error:
            logger.warning("Skipping: %s", error)
            return False
        return True

    processes = min(os.cpu_count() or 1, 8) if len(dataset) >= 10_000 else None  # decoding is CPU-bound
    kept = dataset.filter(readable, desc="Checking images", load_from_cache_file=False, num_proc=processes)
    return kept, len(dataset) - len(kept)


def checked_evaluation_split(split: Dataset, image_column: str, data_args) -> tuple[Dataset, int]:
    """The evaluation images, all decoded once before training (in parallel) so that a file the image processor
    cannot take fails now, not after hours of training (a pass is remembered once per machine); with
    `--skip_corrupt_images` such files are dropped instead. Returns the split and the number dropped."""
    if data_args.skip_corrupt_images:
        return drop_unreadable(split, image_column, data_args.max_image_pixels)
    check_readable(split, image_column, data_args.max_image_pixels)
    return split, 0


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
    """A stream is not opened here: it is checked as training reads it (opening and closing a parquet stream early
    costs a 5 s wait in `datasets`)."""
    if not isinstance(dataset, IterableDataset) and len(dataset) == 0:
        raise ValueError(f"The {split} split is empty.")
