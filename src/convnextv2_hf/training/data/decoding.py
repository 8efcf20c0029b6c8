"""Decoding images, once and in one way, and images that cannot be decoded: named in one line, or skipped and
counted (`--skip_corrupt_images`), checked before training where that is cheap."""

from __future__ import annotations

import io
import logging
import math
import os
import re
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import PIL.Image
import PIL.ImageOps
from datasets import Dataset

from ...image_processing_convnextv2 import check_aspect_ratio, to_rgb

logger = logging.getLogger(__name__)


class UnreadableImageError(ValueError):
    """An image file that cannot be decoded (or is refused by the decompression guard); the message names it."""


# --------------------------------------------------------------------------------------------- decoding

# PIL's own decompression-bomb limit: it raises above twice its `Image.MAX_IMAGE_PIXELS` (89,478,485). A literal,
# because a user may have set PIL's attribute to None.
MAX_IMAGE_PIXELS = 178_956_970


def as_image_cell(record: Any) -> dict:
    """`{'bytes', 'path'}` of an image cell: `datasets`' undecoded Image, raw bytes (a parquet binary column) or a
    path string. Anything else means the column is not an image column, which no skipping of files would fix."""
    if isinstance(record, dict) and ("bytes" in record or "path" in record):
        return {"bytes": record.get("bytes"), "path": record.get("path")}
    if isinstance(record, (bytes, bytearray, memoryview)):
        return {"bytes": bytes(record), "path": None}
    if isinstance(record, str):
        return {"bytes": None, "path": record}
    raise ValueError(f"The image column holds {type(record).__name__} values, not images (datasets' Image, raw "
                     "bytes or file paths); name the image column with --image_column_name.")


def stream_image_cell(row: dict, image_column: str) -> Any:
    """`row[image_column]` of a streamed row. A webdataset sample without that member (its image has another
    extension: `datasets` takes a webdataset's columns from its first samples and drops other members) is an
    [`UnreadableImageError`] naming the sample, its shard and the fix."""
    cell = row.get(image_column)
    if isinstance(cell, dict) and "__url__" in row:  # errors then name the shard too, not the member alone
        return {**cell, "path": f"{cell.get('path')} in shard {row['__url__']}"}
    if cell is None and "__key__" in row:
        raise UnreadableImageError(
            f"Sample {row['__key__']!r} of shard {row.get('__url__')} has no .{image_column} member; datasets reads a "
            f"webdataset's members from its first samples, so an image under another extension is not seen. Give "
            "every image member the same extension (convnextv2-hf write-shards names them all .jpg).")
    return cell


def open_image_header(record: Any, max_pixels: int = MAX_IMAGE_PIXELS) -> PIL.Image.Image:
    """Open one undecoded image cell (`{'path', 'bytes'}`) lazily, reading only its header; files that are not
    images, or exceed the decompression guard, raise [`UnreadableImageError`] naming their path (kept as the
    image's `source` for errors met when it is decoded)."""
    if isinstance(record, PIL.Image.Image):
        return record
    record = as_image_cell(record)
    path = record["path"]
    try:
        if record.get("bytes") is not None:
            image = PIL.Image.open(io.BytesIO(record["bytes"]))
        elif path is not None:
            image = PIL.Image.open(path)
        else:
            raise ValueError("the cell holds neither bytes nor a path")
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
        path = None if isinstance(record, PIL.Image.Image) else as_image_cell(record)["path"]
        raise UnreadableImageError(f"Image {path or '<in-memory image>'}: {error} (or pass --skip_corrupt_images)"
                                   ) from None
    return image


def unreadable(path: str | None, error: Exception) -> UnreadableImageError:
    reason = re.sub(r" <_io\.BytesIO object at 0x[0-9a-f]+>", "", str(error))  # PIL names the buffer it was given
    return UnreadableImageError(
        f"Cannot read image {path or '<in-memory bytes>'}: {reason}. Remove it or pass --skip_corrupt_images.")


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
    same files (paths, sizes, modification and change times, inodes), which other processes of a launch and every
    resume reuse. The change time catches a file replaced by one of the same size and modification time (`cp -p`,
    `touch -d`): no user command can set it. A marker in the datasets cache records a pass; files given as bytes are
    always checked."""
    import hashlib

    from datasets import config

    from .cache import record_in_cache

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
            digest.update(f"{path}\0{stat.st_size}\0{stat.st_mtime_ns}\0{stat.st_ctime_ns}\0{stat.st_ino}\n".encode())
    marker = Path(config.HF_DATASETS_CACHE, "convnextv2_hf", "checked", digest.hexdigest())
    yield not marker.exists()
    record_in_cache(str(marker))


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
