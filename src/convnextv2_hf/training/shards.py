"""Sharded image sets: local webdataset tar shards or parquet shards, read through `datasets` streaming, and a
writer that makes them from an image folder (as users prepare ImageNet for many machines).

A webdataset shard holds `<key>.<image extension>` members (and `<key>.cls`, the class index, for class folders); a
parquet shard holds an `image` column (`{bytes, path}`, `datasets`' Image feature) and a `label` column. Both are
what the hub's own copies of ImageNet use, so the same shards can be pushed and streamed back.
"""

from __future__ import annotations

import glob
import io
import json
import logging
import os
import tarfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

logger = logging.getLogger(__name__)

SHARD_FORMATS = {".tar": "webdataset", ".parquet": "parquet"}
UNFINISHED = ".write-shards-unfinished"  # in a folder while write-shards writes it; removed once the set is complete


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
    return kinds.pop(), files


def check_finished(files: list[str], flag: str) -> None:
    """Refuse shards from a folder that `write-shards` did not finish (killed midway: some shards, no labels)."""
    for folder in sorted({os.path.dirname(path) for path in files}):
        if os.path.exists(os.path.join(folder, UNFINISHED)) or glob.glob(os.path.join(glob.escape(folder), "*.partial")):
            raise ValueError(f"{flag}: {folder} holds a shard set that write-shards did not finish (it was stopped "
                             "midway; some shards and the labels are missing); write it again into an empty folder.")


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
    if source is not None and getattr(data_args, "validation_dir", None):
        raise ValueError(f"--validation_dir {data_args.validation_dir!r} would not be read: a run streamed from "
                         f"shards ({source[1]}) has no validation pass yet; drop --validation_dir, or train from an "
                         "image folder.")
    return source


def load_shards(patterns: list[str], flag: str):
    """The shards as a streaming `IterableDatasetDict` with a train split; each shard is a unit that
    `split_dataset_by_node` and the data-loader workers share out."""
    from datasets import load_dataset

    builder, files = expand_shard_patterns(patterns, flag)
    logger.info("%s: %d %s shard(s), streamed", flag, len(files), builder)
    return load_dataset(builder, data_files={"train": files}, streaming=True)


# --------------------------------------------------------------------------------------------- writing


def write_shards(train_dir: str, output_dir: str, shard_format: str = "webdataset", images_per_shard: int = 1000,
                 num_proc: int | None = None) -> list[str]:
    """Write the images of `train_dir` (two or more class sub-folders become labels; other layouts, one image
    sub-folder included, are written without labels) into numbered shards in `output_dir`, in parallel, image bytes
    unchanged; returns the shard paths. Shards hold the folder's sorted order: a streaming run shuffles shard order
    and a buffer, so keep shards small enough (about 1,000 images) to mix well."""
    from tqdm.auto import tqdm

    from .data import scan_folder

    for flag, value in (("--images_per_shard", images_per_shard), ("--num_proc", num_proc)):
        if value is not None and value < 1:
            raise ValueError(f"{flag} {value} must be a positive integer (images per shard: about 1,000 mixes well; "
                             "processes: at most the cores).")
    scan = scan_folder(train_dir, "--train_dir")
    labelled = len(scan.classes) >= 2 and all(len(parts) == 1 for parts, _ in scan.folders)
    paths = scan.paths()
    index = {name: i for i, name in enumerate(scan.classes)}
    labels = ([index[parts[0]] for parts, names in scan.folders for _ in range(len(names))] if labelled
              else [None] * len(paths))
    out = prepare_output(train_dir, output_dir)
    suffix = ".tar" if shard_format == "webdataset" else ".parquet"
    count = -(-len(paths) // images_per_shard)
    jobs = [(str(out / f"train-{i:05d}-of-{count:05d}{suffix}"), i * images_per_shard,
             paths[i * images_per_shard:(i + 1) * images_per_shard], labels[i * images_per_shard:(i + 1) * images_per_shard],
             scan.classes if labelled else None) for i in range(count)]
    writer = write_tar_shard if shard_format == "webdataset" else write_parquet_shard
    workers = num_proc or min(8, os.cpu_count() or 1)
    with ProcessPoolExecutor(workers) as pool:
        written = list(tqdm(pool.map(writer, *zip(*jobs)), total=count, desc=f"Writing {shard_format} shards"))
    (out / "classes.json").write_text(json.dumps(scan.classes if labelled else []))
    (out / UNFINISHED).unlink()  # last: the set is complete
    return written


def prepare_output(train_dir: str, output_dir: str) -> Path:
    """A new or empty `output_dir`, not inside `train_dir` (shards there would be read as data next time)."""
    out, source = Path(output_dir).resolve(), Path(train_dir).resolve()
    if out == source or source in out.parents:
        raise ValueError(f"--output_dir {output_dir} is inside --train_dir {train_dir}; write the shards elsewhere.")
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"--output_dir {output_dir} is not empty; give a new folder (nothing is overwritten).")
    out.mkdir(parents=True, exist_ok=True)
    (out / UNFINISHED).write_text("write-shards is writing this folder; it removes this file when the set is complete\n")
    return out


# Every image member is `<key>.jpg`, whatever the file's format: `datasets` reads a webdataset's columns from its
# first samples, so a PNG or WebP member among JPEGs would be dropped. The bytes stay the file's own; readers (PIL,
# `datasets`' Image feature, the `webdataset` library) decode them by content, not by name.
IMAGE_MEMBER = "jpg"


def write_tar_shard(path: str, start: int, files: list[str], labels: list, classes) -> str:
    """One webdataset shard: `<key>.jpg` image bytes (any format, see `IMAGE_MEMBER`) and `<key>.cls` labels;
    written aside, then renamed."""
    partial = f"{path}.partial"
    with tarfile.open(partial, "w") as tar:
        for offset, (file, label) in enumerate(zip(files, labels)):
            key = f"{start + offset:09d}"
            add_member(tar, f"{key}.{IMAGE_MEMBER}", Path(file).read_bytes())
            if label is not None:
                add_member(tar, f"{key}.cls", str(label).encode())
    os.replace(partial, path)
    return path


def add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_parquet_shard(path: str, start: int, files: list[str], labels: list, classes) -> str:
    """One parquet shard with `datasets`' Image feature (bytes embedded, the file name kept) and a ClassLabel."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from datasets import ClassLabel, Features, Image

    images = [{"bytes": Path(file).read_bytes(), "path": os.path.basename(file)} for file in files]
    columns, features = {"image": images}, {"image": Image()}
    if classes is not None:
        columns["label"], features["label"] = labels, ClassLabel(names=classes)
    schema = Features(features).arrow_schema
    partial = f"{path}.partial"
    pq.write_table(pa.Table.from_pydict(columns, schema=schema), partial)
    os.replace(partial, path)
    return path
