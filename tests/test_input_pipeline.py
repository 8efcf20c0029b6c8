"""The training input pipeline: folder scans, reduced-size JPEG decoding, unreadable images met during training."""

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from conftest import make_image_folder, write_photo
from convnextv2_hf.training.data import transforms
from convnextv2_hf.training.data.transforms import PretrainTransform, sample_generator
from convnextv2_hf.training.data.decoding import UnreadableImageError, UnreadableImages, decode_image, open_image_header
from convnextv2_hf.training.data.folders import folder_dataset, scan_folder

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@pytest.mark.parametrize("orientation", [1, 6])
def test_reduced_jpeg_decoding_cuts_the_same_box_with_close_pixels(tmp_path, monkeypatch, orientation):
    """A 2400x1600 photo decoded at reduced scale for a 64 px crop: the crop box drawn is the one drawn on the fully
    decoded image, the decoded image really is smaller, and the pixels differ only by the decoders' rounding."""
    photo = write_photo(tmp_path / "photo.jpg", size=(2400, 1600), orientation=orientation)
    boxes, decoded_sizes = [], []
    draw, load = transforms.random_resized_crop_box, transforms.load_image

    def record_box(*args, **kwargs):
        boxes.append(draw(*args, **kwargs))
        return boxes[-1]

    def record_size(*args, **kwargs):
        decoded_sizes.append(load(*args, **kwargs).size)
        return load(*args, **kwargs)

    monkeypatch.setattr(transforms, "random_resized_crop_box", record_box)
    monkeypatch.setattr(transforms, "load_image", record_size)
    transform = PretrainTransform(64, MEAN, STD)
    full = decode_image({"path": str(photo), "bytes": None})
    upright = (1600, 2400) if orientation == 6 else (2400, 1600)
    assert full.size == upright
    for index in range(6):
        reduced = transform(open_image_header({"path": str(photo), "bytes": None}), sample_generator(0, 0, index))
        exact = transform(full, sample_generator(0, 0, index))
        assert boxes[-2] == boxes[-1]
        assert decoded_sizes[-1] == upright
        assert decoded_sizes[-2][0] <= upright[0] // 2  # decoded at 1/2 scale or smaller
        assert (reduced - exact).abs().mean() < 0.02, index  # normalised units: about 1/255 of a pixel value
    assert min(size[0] for size in decoded_sizes) <= upright[0] // 4


def test_small_crops_of_small_images_are_decoded_in_full(tmp_path):
    """A 500x375 JPEG cropped to 224 px is never decoded below full size (the crop would be upsampled)."""
    photo = write_photo(tmp_path / "small.jpg", size=(500, 375), orientation=1)
    transform = PretrainTransform(224, MEAN, STD)
    full = decode_image({"path": str(photo), "bytes": None})
    for index in range(4):
        reduced = transform(open_image_header({"path": str(photo), "bytes": None}), sample_generator(1, 0, index))
        assert torch.equal(reduced, transform(full, sample_generator(1, 0, index)))


def test_scan_lists_class_folders_in_order_and_labels_them(tmp_path):
    root = make_image_folder(tmp_path / "images", classes=("b-class", "a", "b"), per_class=3, corrupt=False)
    (root / "a" / "notes.txt").write_text("not an image")
    (root / ".hidden").mkdir()
    (root / ".hidden" / "x.png").write_bytes((root / "a" / "0.png").read_bytes())
    scan = scan_folder(root, "--train_dir")
    assert scan.classes == ["a", "b", "b-class"] and len(scan) == 9 and len(scan.ignored) == 1
    table = folder_dataset(scan, labelled=True)
    paths = [row["image"]["path"] for row in table]
    assert paths == [str(root / c / f"{i}.png") for c in ("a", "b", "b-class") for i in range(3)]
    assert table["label"] == [0, 0, 0, 1, 1, 1, 2, 2, 2]


def rows_of(folder):
    return folder_dataset(scan_folder(folder, "--train_dir"), labelled=True)


def test_unreadable_images_stand_in_and_are_counted_once_across_workers(tmp_path):
    root = make_image_folder(tmp_path / "images", per_class=4)  # cats/broken.png sorts first among cats
    rows = rows_of(root)
    broken = [i for i, row in enumerate(rows) if row["image"]["path"].endswith("broken.png")]
    unreadable = UnreadableImages(len(rows), skip=True)

    class Decoded(torch.utils.data.Dataset):
        def __len__(self):
            return len(rows)

        def __getitem__(self, index):
            row, image = unreadable.row_and_image(rows, index, "image")
            return torch.tensor(np.asarray(image.resize((8, 8)))).float().mean()

    for _ in range(2):  # two epochs: the file is met twice, counted once
        values = list(DataLoader(Decoded(), batch_size=3, num_workers=2))
        assert sum(len(v) for v in values) == len(rows)
    assert unreadable.count() == len(broken) == 1
    refuse = UnreadableImages(len(rows), skip=False)
    with pytest.raises(UnreadableImageError, match="broken.png.*--skip_corrupt_images"):
        refuse.row_and_image(rows, broken[0], "image")
    assert refuse.count() is None


def test_a_bad_image_in_a_worker_fails_in_one_line(tmp_path):
    from convnextv2_hf.cli import one_line

    rows = rows_of(make_image_folder(tmp_path / "images", per_class=2))
    refuse = UnreadableImages(len(rows), skip=False)

    class Decoded(torch.utils.data.Dataset):
        def __len__(self):
            return len(rows)

        def __getitem__(self, index):
            return torch.tensor(refuse.row_and_image(rows, index, "image")[1].size)

    with pytest.raises(UnreadableImageError) as raised:
        list(DataLoader(Decoded(), batch_size=2, num_workers=1))
    assert "Traceback" in str(raised.value)
    line = one_line(raised.value)
    assert line.startswith("Cannot read image ") and "broken.png" in line and "Traceback" not in line


LIST_ON_TWO_PROCESSES = """
import json, sys
from pathlib import Path
from accelerate import PartialState
from convnextv2_hf.training.data import sources
from convnextv2_hf.training.arguments import DataArguments

scans = []
scan = sources.scan_folder
sources.scan_folder = lambda *args, **kwargs: scans.append(args[0]) or scan(*args, **kwargs)
state = PartialState(cpu=True)
try:
    splits, ignored = sources.load_image_dataset(DataArguments(train_dir=sys.argv[1], validation_dir=sys.argv[2]),
                                              labelled=True)
    found = {name: [split.features["label"].names, list(split["image"]), list(split["label"])] for name, split in splits.items()}
except ValueError as error:
    found, ignored = str(error), None
Path(sys.argv[3], f"{state.process_index}.json").write_text(json.dumps([len(scans), ignored, found]))
"""


def test_a_folder_is_listed_once_per_machine(tmp_path):
    """Two processes on one machine: the first lists the folders, the second reads the same splits from the index
    it wrote (removed afterwards); an error in the listing is raised by both."""
    from conftest import launch_two_processes

    train = make_image_folder(tmp_path / "train", classes=("a", "b", "c"), per_class=3)
    (train / "a" / "notes.txt").write_text("not an image")
    validation = make_image_folder(tmp_path / "validation", classes=("a", "b", "c"), per_class=2, corrupt=False)
    script = tmp_path / "list.py"
    script.write_text(LIST_ON_TWO_PROCESSES)
    scratch = tmp_path / "tmp"
    scratch.mkdir()

    def results(*folders):
        for old in tmp_path.glob("?.json"):
            old.unlink()
        launch_two_processes(script, [*map(str, folders), str(tmp_path)], TMPDIR=str(scratch))
        return [json.loads((tmp_path / f"{rank}.json").read_text()) for rank in (0, 1)]

    (scans, ignored, found), second = results(train, validation)
    assert (scans, ignored) == (2, 1) and second == [0, ignored, found]
    assert found["train"][0] == ["a", "b", "c"] and len(found["train"][1]) == 3 * 3 + 1  # and the corrupt file
    assert not list(scratch.glob("convnextv2-hf-index-*"))
    (validation / "d").mkdir()
    (validation / "d" / "x.png").write_bytes((validation / "a").glob("*.png").__next__().read_bytes())
    failed = results(train, validation)
    assert [scans for scans, _, _ in failed] == [2, 0] and failed[0][2] == failed[1][2]
    assert failed[0][2].startswith("Class mismatch")


def anonymous_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) / 1024
    pytest.skip("no RssAnon in /proc/self/status on this system")


def test_the_other_processes_map_the_index_instead_of_copying_it(tmp_path):
    """The index the machine's first process wrote is memory-mapped by the others: reading 300,000 ImageNet-like
    paths (about 20 MB) adds almost no private memory, rows read after the file is removed, and a pickled copy
    (a spawned worker's) holds the same rows."""
    import gc
    import pickle

    from datasets import Dataset, DatasetDict

    from convnextv2_hf.training.data.per_machine import read_splits, write_splits

    rows = 300_000
    paths = [f"/data/imagenet/train/n{i % 1000:08d}/n{i % 1000:08d}_{i:09d}.JPEG" for i in range(rows)]
    written = write_splits(DatasetDict({"train": Dataset.from_dict({"path": paths, "label": [i % 1000 for i in
                                                                                            range(rows)]})}),
                           str(tmp_path))
    del paths
    gc.collect()
    before = anonymous_mib()
    index = read_splits(written)["train"]
    grown = anonymous_mib() - before
    size_mib = os.path.getsize(written["train"]) / 2**20
    os.remove(written["train"])
    assert size_mib > 15 and grown < size_mib / 5, (grown, size_mib)
    assert index[123_456] == {"path": "/data/imagenet/train/n00000456/n00000456_000123456.JPEG", "label": 456}
    assert pickle.loads(pickle.dumps(index))[rows - 1]["label"] == 999


def test_uint8_crops_normalised_in_the_training_process_are_the_workers_values_bit_for_bit(tmp_path):
    """Pre-training's loader hands over uint8 crops and the training process normalises them on its device: the
    model sees exactly what a loader that normalised in its workers gave it."""
    from convnextv2_hf.training.data.transforms import normalize_pixels
    from convnextv2_hf.training.data.masked_datasets import collate

    photo = write_photo(tmp_path / "photo.jpg", size=(640, 480), orientation=6)
    image = decode_image({"path": str(photo), "bytes": None})
    floats, uint8s = PretrainTransform(64, MEAN, STD), PretrainTransform(64, MEAN, STD, uint8=True)
    mask = torch.zeros(4, 4, dtype=torch.bool)
    batches = [collate([{"pixel_values": transform(image, sample_generator(3, 1, index)), "bool_masked_pos": mask}
                        for index in range(5)]) for transform in (floats, uint8s)]
    assert batches[0]["pixel_values"].dtype == torch.float32 and batches[1]["pixel_values"].dtype == torch.uint8
    on_device = normalize_pixels(batches[1]["pixel_values"], uint8s.mean, uint8s.std)
    assert torch.equal(on_device, batches[0]["pixel_values"])


def test_persistent_fine_tuning_workers_see_each_new_epoch(tmp_path):
    """Fine-tuning's workers persist across epochs; each sample's augmentation is seeded by (seed, epoch, index),
    so a worker started in epoch 0 must augment with epoch 1's seed after `set_epoch(1)`."""
    from convnextv2_hf.training.data.transforms import SeededAugmentedDataset

    rows = rows_of(make_image_folder(tmp_path / "images", per_class=2, corrupt=False))
    dataset = SeededAugmentedDataset(rows, "image", "label", lambda image, generator: torch.rand(1, generator=generator),
                                     seed=0, unreadable=UnreadableImages(len(rows), skip=False))
    loader = DataLoader(dataset, batch_size=len(rows), num_workers=1, persistent_workers=True)
    first = next(iter(loader))
    dataset.set_epoch(1)
    second = next(iter(loader))  # the same worker process as the first epoch's
    assert first["epoch"].tolist() == [0] * len(rows) and second["epoch"].tolist() == [1] * len(rows)
    assert not torch.equal(first["pixel_values"], second["pixel_values"])
    expected = [torch.rand(1, generator=sample_generator(0, 1, index)) for index in range(len(rows))]
    assert torch.equal(second["pixel_values"], torch.stack(expected))


def test_a_validation_image_replaced_with_the_same_size_and_time_is_checked_again(tmp_path, monkeypatch):
    """The once-per-machine check is skipped only for the very files it passed: a file replaced by a damaged one of
    the same size and modification time (`cp -p`, `touch -d`) is checked again, not met at the end of an epoch."""
    import datasets

    from convnextv2_hf.training.data.decoding import checked_once

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "cache"))
    folder = make_image_folder(tmp_path / "val", per_class=2, corrupt=False)
    scan = scan_folder(folder, "--validation_dir")
    split = folder_dataset(scan, labelled=True)

    def needs_check() -> bool:
        with checked_once(split, "image", "readable") as needed:
            return needed  # leaving the block without an error records a pass

    assert needs_check() is True
    assert needs_check() is False
    victim = next(p for p in sorted(folder.rglob("*")) if p.is_file())
    stat = victim.stat()
    victim.write_bytes(b"\0" * stat.st_size)
    os.utime(victim, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert victim.stat().st_size == stat.st_size and victim.stat().st_mtime_ns == stat.st_mtime_ns
    assert needs_check() is True
