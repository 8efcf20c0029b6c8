"""`convnextv2-hf write-shards`: an image folder written as webdataset or parquet shards (as users prepare
ImageNet for many machines), in parallel, complete or marked unfinished."""

from __future__ import annotations

import io
import json
import logging
import os
import tarfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from .folders import scan_folder
from .shards import SHARD_ROWS, UNFINISHED

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------- writing


def write_shards(train_dir: str, output_dir: str, shard_format: str = "webdataset", images_per_shard: int = 1000,
                 num_proc: int | None = None, seed: int | None = 0) -> list[str]:
    """Write the images of `train_dir` (two or more class sub-folders become labels; other layouts, one image
    sub-folder included, are written without labels) into numbered shards in `output_dir`, in parallel, image bytes
    unchanged; returns the shard paths. The images are shuffled across shards by `seed` (None: the folder's sorted
    order): a stream shuffles shard order and a 1,000-row buffer only, so shards of a sorted class folder (about one
    class each, at ImageNet's 1,300 images per class) would give batches of one or two classes."""
    from tqdm.auto import tqdm

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
    if seed is not None:
        import numpy as np

        order = np.random.default_rng(seed).permutation(len(paths))
        paths, labels = [paths[i] for i in order], [labels[i] for i in order]
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
    # rows per shard, so that a streamed run knows its length without opening the shards
    (out / SHARD_ROWS).write_text(json.dumps({Path(job[0]).name: len(job[2]) for job in jobs}))
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
