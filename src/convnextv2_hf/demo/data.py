"""The demo's images: scikit-learn's digits (or your folder), a held-out test split, and labelled subsets."""

from __future__ import annotations

import random
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass
class DemoData:
    """`root/train` (every training image, for label-free pre-training), `root/test` (held out), and the training
    files of each class, from which labelled subsets are drawn."""

    root: Path
    class_names: list[str]
    train_files: dict[int, list[Path]]
    source: str

    @property
    def train_dir(self) -> Path:
        return self.root / "train"

    @property
    def test_dir(self) -> Path:
        return self.root / "test"

    @property
    def num_train(self) -> int:
        return sum(len(files) for files in self.train_files.values())

    def per_class(self, labels: int | None) -> float:
        """Labelled images per class: `labels`, or the average class size for all of them."""
        return labels if labels is not None else self.num_train / len(self.class_names)


def files_under(folder: Path) -> list[Path]:
    """Every file below `folder` (class sub-folders included), sorted."""
    return sorted(p for p in folder.rglob("*") if p.is_file())


def write_digits(root: Path, image_size: int) -> list[tuple[Path, int]]:
    """scikit-learn's digits as PNG files (upscaled to `image_size`), one folder per digit."""
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    files = []
    for i, (pixels, label) in enumerate(zip(digits.images, digits.target)):
        folder = root / str(label)
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{i:04d}.png"
        Image.fromarray((pixels * (255 / 16)).astype(np.uint8), mode="L").resize(
            (image_size, image_size), Image.BICUBIC).save(path)
        files.append((path, int(label)))
    return files


def list_folder(root: Path) -> tuple[list[tuple[Path, int]], list[str]]:
    """(image file, class index) pairs of a folder with one sub-folder per class (other files are ignored and
    counted, the layout is checked as the fine-tuning script checks it), and the class names."""
    from ..training.data.folders import check_class_layout, scan_folder

    scan = scan_folder(root, "--train_dir")
    classes = check_class_layout(scan, "--train_dir")
    index = {name: i for i, name in enumerate(classes)}
    return [(Path(scan.root, *parts, name), index[parts[0]]) for parts, names in scan.folders
            for name in names.to_pylist()], classes


def prepare_data(root: Path, files, class_names: list[str], test_fraction: float, source: str, seed: int = 0):
    """Split every class into held-out test images and training images (copied under `root`)."""
    rng = random.Random(seed)
    by_class: dict[int, list[Path]] = {}
    for path, label in files:
        by_class.setdefault(label, []).append(path)
    train_files = {}
    for label, paths in sorted(by_class.items()):
        paths = sorted(paths)
        rng.shuffle(paths)
        n_test = max(1, int(round(len(paths) * test_fraction)))
        for split, chosen in (("test", paths[:n_test]), ("train", paths[n_test:])):
            folder = root / split / class_names[label]
            folder.mkdir(parents=True, exist_ok=True)
            copies = [folder / f"{p.parent.name}_{p.name}" for p in chosen]
            for source_path, copy in zip(chosen, copies):
                shutil.copy(source_path, copy)
            if split == "train":
                train_files[label] = copies
    return DemoData(root, class_names, train_files, source)


def labelled_folder(data: DemoData, labels: int | None, seed: int) -> Path:
    """A folder with `labels` images per class drawn from the training images with `seed` (all of them for None)."""
    if labels is None:
        return data.train_dir
    folder = data.root / "labelled" / f"{labels}-per-class-seed{seed}"
    if folder.exists():
        return folder
    rng = random.Random(1000 + seed)
    for label, files in data.train_files.items():
        if len(files) < labels:
            raise ValueError(f"Class {data.class_names[label]!r} has only {len(files)} training images, fewer than "
                             f"{labels} labels per class; lower --label_counts.")
        target = folder / data.class_names[label]
        target.mkdir(parents=True)
        for path in rng.sample(files, labels):
            shutil.copy(path, target / path.name)
    return folder


def stratified_sample(files: list[Path], count: int, seed: int = 0) -> list[Path]:
    """`count` files drawn evenly across their class folders (round robin over shuffled classes), seeded."""
    rng = random.Random(seed)
    by_class: dict[str, list[Path]] = {}
    for path in sorted(files):
        by_class.setdefault(path.parent.name, []).append(path)
    for paths in by_class.values():
        rng.shuffle(paths)
    chosen, round_index = [], 0
    while len(chosen) < min(count, len(files)):
        for paths in by_class.values():
            if round_index < len(paths) and len(chosen) < count:
                chosen.append(paths[round_index])
        round_index += 1
    return chosen
