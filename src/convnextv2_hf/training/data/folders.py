"""Local image folders: scanned once (images counted, other files ignored and counted, a stray `metadata.csv`
named, the class layout checked), and the list of image files made a `Dataset` directly in Arrow, as `datasets`'
`imagefolder` builder would lay it out."""

from __future__ import annotations

import functools
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from datasets import Dataset, Image
from datasets.packaged_modules.folder_based_builder.folder_based_builder import FolderBasedBuilder
from datasets.packaged_modules.imagefolder.imagefolder import IMAGE_EXTENSIONS

logger = logging.getLogger(__name__)
METADATA_FILENAMES = tuple(FolderBasedBuilder.METADATA_FILENAMES)


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
