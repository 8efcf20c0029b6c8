"""Sharded image sets read through `datasets` streaming: local webdataset tar shards or parquet shards, found by
glob or in a folder, refused in one line when unfinished, of mixed kinds, or damaged where a cheap look shows it.

A webdataset shard holds `<key>.<image extension>` members (and `<key>.cls`, the class index, for class folders); a
parquet shard holds an `image` column (`{bytes, path}`, `datasets`' Image feature) and a `label` column. Both are
what the hub's own copies of ImageNet use, so the same shards can be pushed and streamed back.
"""

from __future__ import annotations

import glob
import logging
import os
import tarfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from .cache import stream_cache_dir

logger = logging.getLogger(__name__)

SHARD_FORMATS = {".tar": "webdataset", ".parquet": "parquet"}
UNFINISHED = ".write-shards-unfinished"  # in a folder while write-shards writes it; removed once the set is complete
SHARD_ROWS = "shards.json"  # written by write-shards beside its shards: {shard file name: images}


def expand_shard_patterns(patterns: list[str], flag: str) -> tuple[str, list[str]]:
    """(`datasets` builder name, sorted shard files) of glob patterns; one clear error for a pattern that matches
    nothing, an unknown extension, or webdataset and parquet shards mixed."""
    files = []
    for pattern in patterns:
        matched = sorted(glob.glob(os.path.expanduser(pattern), recursive=True))
        if not matched:
            raise FileNotFoundError(f"{flag} {pattern!r} matches no files; give shard paths or globs such as "
                                    "'data/train-*.tar' or 'data/train-*.parquet'.")
        files.extend(os.path.abspath(path) for path in matched)
    files = sorted(dict.fromkeys(files))
    kinds = {SHARD_FORMATS.get(os.path.splitext(path)[1].lower()) for path in files}
    if None in kinds:
        odd = next(path for path in files if os.path.splitext(path)[1].lower() not in SHARD_FORMATS)
        raise ValueError(f"{flag}: {odd} is not a shard (.tar webdataset or .parquet); for a folder of images, "
                         "pass --train_dir.")
    if len(kinds) > 1:
        raise ValueError(f"{flag} mixes webdataset (.tar) and parquet shards; pass one kind.")
    check_finished(files, flag)
    builder = kinds.pop()
    check_shard_files(files, builder, flag)
    return builder, files


def check_finished(files: list[str], flag: str) -> None:
    """Refuse shards from a folder that `write-shards` did not finish (killed midway: some shards, no labels)."""
    for folder in sorted({os.path.dirname(path) for path in files}):
        if os.path.exists(os.path.join(folder, UNFINISHED)) or glob.glob(os.path.join(glob.escape(folder), "*.partial")):
            raise ValueError(f"{flag}: {folder} holds a shard set that write-shards did not finish (it was stopped "
                             "midway; some shards and the labels are missing); write it again into an empty folder.")


TAR_BLOCK = 512


def check_shard_files(files: list[str], builder: str, flag: str) -> None:
    """Refuse, in one line naming the shard, one that is empty, truncated, not a tar or parquet file, or holds no
    rows. Each check is a stat and one read (a tar's first header, a parquet footer), in threads: it stays cheap at
    thousands of shards. Damage past the first header of a tar is met where the stream reads it."""
    problem_of = tar_problem if builder == "webdataset" else parquet_problem
    with ThreadPoolExecutor(max_workers=min(16, len(files))) as pool:
        for path, problem in zip(files, pool.map(problem_of, files)):
            if problem:
                raise ValueError(f"{flag}: shard {path} {problem}; write the shards again (convnextv2-hf "
                                 f"write-shards) or leave this one out of {flag}.")


def tar_problem(path: str) -> str | None:
    size = os.path.getsize(path)
    if size == 0:
        return "is empty (0 bytes)"
    if size % TAR_BLOCK:
        return f"is truncated ({size} bytes, not whole 512-byte tar blocks)"
    with open(path, "rb") as handle:
        header = handle.read(TAR_BLOCK)
    if header == bytes(TAR_BLOCK):
        return "is an empty tar archive (no images)"
    try:
        tarfile.TarInfo.frombuf(header, "utf-8", "surrogateescape")
    except tarfile.HeaderError:
        return "is not a tar archive (its first header is damaged)"
    return None


def parquet_problem(path: str) -> str | None:
    import pyarrow.parquet as pq

    if os.path.getsize(path) == 0:
        return "is empty (0 bytes)"
    try:
        rows = pq.read_metadata(path).num_rows
    except Exception as error:  # pyarrow raises ArrowInvalid or OSError, depending on the damage
        return f"is not a readable parquet file ({str(error).splitlines()[0]})"
    return "holds no rows" if rows == 0 else None


def shards_in_folder(root: str | os.PathLike) -> list[str]:
    """The shard files directly inside `root` (a folder of shards given as --train_dir); an empty list for an image
    folder. A folder holding shards beside images or sub-folders is refused: which to train on is the user's call."""
    from datasets.packaged_modules.imagefolder.imagefolder import IMAGE_EXTENSIONS

    with os.scandir(root) as entries:
        entries = [entry for entry in entries if not entry.name.startswith(".")]
    shards = sorted(entry.path for entry in entries if os.path.splitext(entry.name)[1].lower() in SHARD_FORMATS)
    others = sorted(entry.name + ("/" if entry.is_dir() else "") for entry in entries
                    if entry.is_dir() or os.path.splitext(entry.name)[1].lower() in IMAGE_EXTENSIONS)
    if shards and others:
        raise ValueError(f"--train_dir {str(root)!r} holds both shards ({', '.join(Path(f).name for f in shards[:2])}"
                         f"{', ...' if len(shards) > 2 else ''}) and images or folders ({', '.join(others[:2])}"
                         f"{', ...' if len(others) > 2 else ''}); move one kind elsewhere, or name the shards with "
                         "--train_files.")
    return shards


def sharded_source(data_args) -> tuple[list[str], str] | None:
    """(shard patterns, the flag that gave them) when the data are shards: --train_files, or a --train_dir that
    holds shards; None for an image folder or a hub dataset."""
    source = None
    if getattr(data_args, "train_files", None):
        if data_args.train_dir is not None:
            raise ValueError("Pass --train_files (shards) or --train_dir (a folder), not both.")
        source = list(data_args.train_files), "--train_files"
    elif data_args.train_dir is not None and os.path.isdir(data_args.train_dir):
        files = shards_in_folder(data_args.train_dir)
        source = (files, "--train_dir") if files else None
    return source


def load_shards(patterns: list[str], flag: str):
    """The shards as a streaming `IterableDatasetDict` with a train split; each shard is a unit that the processes
    and data-loader workers share out ([`ResumableStream`])."""
    return open_shards(*expand_shard_patterns(patterns, flag), flag)


def open_shards(builder: str, files: list[str], flag: str):
    """Checked shard files ([`expand_shard_patterns`]) as a streaming `IterableDatasetDict` with a train split."""
    from datasets import load_dataset

    logger.info("%s: %d %s shard(s), streamed", flag, len(files), builder)
    try:
        return load_dataset(builder, data_files={"train": files}, streaming=True, cache_dir=stream_cache_dir())
    except ValueError as error:
        if builder != "webdataset" or "don't share the same prefix" not in str(error):
            raise
        kinds = sorted({"+".join(members) for members in first_members(files[0])})
        raise ValueError(f"{flag}: the first samples of shard {files[0]} hold different members ({', '.join(kinds)}), "
                         "and datasets reads a webdataset's columns from its first samples; give every sample the same "
                         "member extensions (convnextv2-hf write-shards names every image .jpg).") from None


def first_members(path: str, samples: int = 5) -> list[tuple[str, ...]]:
    """The member extensions of the first `samples` samples of a webdataset tar (from its headers)."""
    found: dict[str, list[str]] = {}
    with tarfile.open(path) as archive:
        for member in archive:
            key, _, extension = os.path.basename(member.name).partition(".")
            if key not in found and len(found) == samples:
                break
            found.setdefault(key, []).append(extension)
    return [tuple(sorted(extensions)) for extensions in found.values()]


def shard_row_counts(files: list[str], builder: str, count_missing: bool = True) -> list[int | None]:
    """The images in each of `files`: from the `shards.json` that write-shards leaves beside its shards, else (with
    `count_missing`) from each parquet footer or each tar's member headers, in threads (a tar's image bytes are
    skipped, not read); None where not counted."""
    import json

    recorded = {}
    for folder in {os.path.dirname(path) for path in files}:
        record = Path(folder, SHARD_ROWS)
        if record.is_file():
            recorded.update({os.path.join(folder, name): rows for name, rows in json.loads(record.read_text()).items()})
    missing = [path for path in files if path not in recorded]
    if missing and count_missing:
        logger.info("Counting the images of %d shard(s) without a %s record", len(missing), SHARD_ROWS)
        with ThreadPoolExecutor(max_workers=min(16, len(missing))) as pool:
            recorded.update(zip(missing, pool.map(tar_rows if builder == "webdataset" else parquet_rows, missing)))
    return [recorded.get(path) for path in files]


def tar_rows(path: str) -> int:
    """Samples (distinct keys of image members) in a webdataset tar."""
    from datasets.packaged_modules.imagefolder.imagefolder import IMAGE_EXTENSIONS

    with tarfile.open(path) as archive:
        return len({os.path.splitext(member.name)[0] for member in archive
                    if os.path.splitext(member.name)[1].lower() in IMAGE_EXTENSIONS})


def parquet_rows(path: str) -> int:
    import pyarrow.parquet as pq

    return pq.read_metadata(path).num_rows


def shard_class_names(files: list[str]) -> list[str] | None:
    """The class names in the `classes.json` beside the shards (write-shards writes it; an empty list for shards
    without labels); None where there is none."""
    import json

    record = Path(os.path.dirname(files[0]), "classes.json")
    return json.loads(record.read_text()) if record.is_file() else None
