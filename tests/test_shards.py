"""Pre-training on webdataset and parquet shards: writing them, reading them streamed, sharing them out between
processes and workers, resuming a streamed run exactly."""

import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import (CLI, LAUNCH, PRETRAIN, TINY_OVERRIDES as TINY, assert_one_line, free_port, launch_two_processes,
                      make_image_folder, run_as_user)
from convnextv2_hf.training.pretrain import main as pretrain
from convnextv2_hf.training.data.shards import load_shards
from convnextv2_hf.training.data.shard_writer import write_shards

SUFFIX = {"webdataset": ".tar", "parquet": ".parquet"}


def numbered_folder(root, count=16):
    """`count` images in two classes, image i being (40 + i) px wide: a sample's width says which image it is."""
    for i in range(count):
        folder = root / ("even" if i % 2 == 0 else "odd")
        folder.mkdir(parents=True, exist_ok=True)
        pixels = np.full((48, 40 + i, 3), 10 * i % 255, dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"{i:02d}.jpg")
    return root


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """Both formats of the same 16 numbered images plus the messy folder, 4 images per shard."""
    base = tmp_path_factory.mktemp("shards")
    numbered = numbered_folder(base / "numbered")
    messy = make_image_folder(base / "messy", per_class=6)  # 12 readable images and one corrupt file
    for name, folder in (("numbered", numbered), ("messy", messy)):
        for kind in SUFFIX:
            write_shards(str(folder), str(base / f"{name}-{kind}"), kind, images_per_shard=4, num_proc=1)
    return base


@pytest.mark.parametrize("kind", list(SUFFIX))
def test_written_shards_hold_every_image_once_with_its_label(shards, kind):
    train = load_shards([str(shards / f"numbered-{kind}" / f"*{SUFFIX[kind]}")], "--train_files")["train"]
    assert train.num_shards == 4
    image_column, label_column = ("jpg", "cls") if kind == "webdataset" else ("image", "label")
    widths = {row[image_column].width: row[label_column] for row in train}
    assert widths == {40 + i: i % 2 for i in range(16)}
    assert json.loads((shards / f"numbered-{kind}" / "classes.json").read_text()) == ["even", "odd"]


def test_write_shards_mixes_the_classes_unless_asked_to_keep_the_order(shards, tmp_path):
    """A sorted two-class folder in shards of 4: shuffled (the default), shards mix both classes; --keep_order's
    first shard holds one class."""
    def shard_labels(folder):
        train = load_shards([str(folder / "*.parquet")], "--train_files")["train"]
        return [train.shard(num_shards=train.num_shards, index=i)["label"] for i in range(train.num_shards)]

    sorted_folder = tmp_path / "sorted"
    write_shards(str(shards / "numbered"), str(sorted_folder), "parquet", images_per_shard=4, num_proc=1, seed=None)
    kept = [list(labels) for labels in shard_labels(sorted_folder)]
    assert kept[0] == [0, 0, 0, 0] and kept[-1] == [1, 1, 1, 1]
    mixed = [list(labels) for labels in shard_labels(shards / "numbered-parquet")]
    assert sorted(sum(mixed, [])) == sorted(sum(kept, [])) and any(len(set(labels)) == 2 for labels in mixed)


def test_processes_and_workers_each_read_their_own_part(shards):
    """Two processes with two data-loader workers each: every image exactly once per epoch."""
    from torch.utils.data import DataLoader

    from convnextv2_hf.training.data.sources import undecoded
    from convnextv2_hf.training.data.masked_datasets import StreamingMaskedImageDataset, collate

    train = undecoded(load_shards([str(shards / "numbered-webdataset" / "*.tar")], "--train_files")["train"], "jpg")
    widths = []
    for rank in range(2):
        part = StreamingMaskedImageDataset(train, "jpg",
                                           transform=lambda image, generator: torch.tensor(float(image.width)),
                                           draw_mask=lambda pixels, generator: torch.zeros(1), seed=0, rank=rank,
                                           world=2)
        for batch in DataLoader(part, batch_size=2, num_workers=2, collate_fn=collate):
            widths += batch["pixel_values"].int().tolist()
    assert sorted(widths) == [40 + i for i in range(16)]


def shard_args(source, output_dir, *extra):
    return [*source, "--output_dir", str(output_dir), "--config_overrides", TINY, "--image_size", "32",
            "--per_device_train_batch_size", "2", "--learning_rate", "1e-3", "--num_warmup_steps", "1",
            "--sparse_grn_scope", "sample", "--seed", "5", "--dataloader_num_workers", "2", *extra]


def losses(output_dir):
    return json.loads((Path(output_dir) / "train_results.json").read_text())["loss_history"]


@pytest.mark.slow
@pytest.mark.parametrize("kind", list(SUFFIX))
def test_streamed_run_resumes_at_the_sample_where_it_stopped(shards, tmp_path, kind):
    """8 steps over shards of the messy folder (its corrupt image skipped where met), checkpointed at step 5, in
    the middle of a pass; resumed from that checkpoint in a new folder (as after a kill), the losses of steps 6-8
    are the uninterrupted run's."""
    source = ["--train_files", str(shards / f"messy-{kind}" / f"*{SUFFIX[kind]}")]
    full = tmp_path / "full"
    summary = pretrain(shard_args(source, full, "--max_train_steps", "8", "--checkpointing_steps", "5",
                                  "--skip_corrupt_images"))
    assert summary["skipped_images"] >= 1  # the corrupt image, met in the workers (once per pass)
    kept = tmp_path / "kept" / "checkpoint-5"
    os.renames(full / "checkpoint-5", kept)
    saved = json.loads((kept / "training_state.json").read_text())["stream"]
    # one process: [worker of the next batch, then epoch and last row of worker 0, of worker 1]
    assert len(saved) == 1 and len(saved[0]) == 5 and saved[0][0] == 1  # steps 1, 3, 5 from worker 0
    resumed = tmp_path / "resumed"
    pretrain(shard_args(source, resumed, "--max_train_steps", "8", "--skip_corrupt_images",
                        "--resume_from_checkpoint", str(kept)))
    expected, got = losses(full), losses(resumed)
    assert [step for step, _ in got] == list(range(1, 9))
    for (_, a), (_, b) in zip(expected, got):
        assert a == pytest.approx(b, rel=1e-5)


@pytest.mark.slow
def test_two_processes_stream_their_own_shards_and_checkpoint_both_places(shards, tmp_path):
    out = tmp_path / "two"
    launch_two_processes(PRETRAIN[1], shard_args(["--train_files", str(shards / "numbered-webdataset" / "*.tar")], out,
                                                 "--max_train_steps", "3", "--checkpointing_steps", "3"))
    saved = json.loads((out / "checkpoint-3" / "training_state.json").read_text())["stream"]
    # 4 shards: 2 per process, 1 per worker; 3 steps of 2 images per process take rows from both workers
    assert len(saved) == 2 and all(len(part) == 5 and part[0] == 1 and part[1] == part[3] == 0
                                   and min(part[2], part[4]) >= 0 for part in saved)
    assert len(losses(out)) == 3


def test_a_folder_of_shards_as_train_dir_and_clear_errors(shards, tmp_path):
    summary = pretrain(shard_args(["--train_dir", str(shards / "numbered-parquet")], tmp_path / "run",
                                  "--max_train_steps", "2", "--dataloader_num_workers", "0"))
    assert summary["completed_steps"] == 2
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    for shard in (shards / "numbered-webdataset").glob("*.tar"):
        (mixed / shard.name).write_bytes(shard.read_bytes())
    (mixed / "stray.jpg").write_bytes(next((shards / "numbered" / "even").iterdir()).read_bytes())
    for extra, words in [
        (["--train_dir", str(mixed), "--max_train_steps", "1"], ["holds both shards", "stray.jpg", "--train_files"]),
        (["--train_files", str(shards / "numbered-parquet" / "*.parquet"), "--validation_dir", str(shards / "numbered"),
          "--max_train_steps", "1"], ["--validation_dir", "no validation pass"]),
        (["--train_files", str(tmp_path / "none-*.tar"), "--max_train_steps", "1"], ["matches no files"]),
        (["--train_files", str(shards / "numbered-parquet" / "*.parquet")], ["--max_train_steps"]),
        (["--train_files", str(shards / "numbered-parquet" / "*.parquet"), str(shards / "numbered-webdataset/*.tar"),
          "--max_train_steps", "1"], ["mixes webdataset"]),
    ]:
        result = run_as_user([*PRETRAIN, *shard_args([], tmp_path / "o", *extra)], tmp_path, timeout=120)
        assert_one_line(result, *words)


def test_write_shards_command_refuses_to_overwrite(shards, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("a user's file")
    result = run_as_user([*CLI, "write-shards", "--train_dir", str(shards / "numbered"), "--output_dir", str(out)],
                         tmp_path, timeout=120)
    assert_one_line(result, "not empty")
    assert (out / "mine.txt").read_text() == "a user's file"
    result = run_as_user([*CLI, "write-shards", "--train_dir", str(shards / "numbered"), "--output_dir",
                          str(tmp_path / "new"), "--format", "parquet", "--images_per_shard", "5"], tmp_path, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert sorted(p.name for p in (tmp_path / "new").glob("*.parquet")) == [
        f"train-{i:05d}-of-00004.parquet" for i in range(4)]
    result = run_as_user([*CLI, "write-shards", "--train_dir", str(shards / "numbered"), "--output_dir",
                          str(tmp_path / "zero"), "--images_per_shard", "0"], tmp_path, timeout=120)
    assert_one_line(result, "--images_per_shard 0 must be a positive integer")
    for images, processes in ((-1, None), (4, -1), (4, 0)):
        with pytest.raises(ValueError, match="must be a positive integer"):
            write_shards(str(shards / "numbered"), str(tmp_path / "never"), "webdataset", images, processes)
    assert not (tmp_path / "zero").exists() and not (tmp_path / "never").exists()


@pytest.mark.parametrize("kind", list(SUFFIX))
def test_one_image_folder_is_written_without_labels(tmp_path, kind):
    """`images/` holding one sub-folder of photos (as pre-training folders often are) is not a class layout."""
    numbered = numbered_folder(tmp_path / "data")
    (numbered / "odd").rename(tmp_path / "odd")
    write_shards(str(numbered), str(tmp_path / "shards"), kind, images_per_shard=4, num_proc=1)
    train = load_shards([str(tmp_path / "shards" / f"*{SUFFIX[kind]}")], "--train_files")["train"]
    image_column = "jpg" if kind == "webdataset" else "image"
    rows = list(train)
    assert sorted(row[image_column].width for row in rows) == [40 + i for i in range(0, 16, 2)]
    assert all(set(row) <= {image_column, "__key__", "__url__"} for row in rows)
    assert json.loads((tmp_path / "shards" / "classes.json").read_text()) == []


@pytest.mark.parametrize("kind", list(SUFFIX))
def test_a_folder_of_mixed_image_formats_comes_back_whole(tmp_path, kind):
    """JPEG, PNG, BMP, GIF, WebP and TIFF together, and a PNG named .JPEG (as ImageNet has): every image written
    comes back from the stream, byte for byte, with its label, and decodes."""
    import io

    folder, originals = tmp_path / "mixed", {}
    rng = np.random.default_rng(0)
    formats = [("JPEG", ".jpg"), ("PNG", ".png"), ("BMP", ".bmp"), ("GIF", ".gif"), ("WEBP", ".webp"),
               ("TIFF", ".tif"), ("PNG", ".JPEG")]
    for i, (image_format, suffix) in enumerate(formats * 2):
        target = folder / ("a" if i % 2 == 0 else "b") / f"{i:02d}{suffix}"
        target.parent.mkdir(parents=True, exist_ok=True)
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (20, 24 + i, 3), dtype=np.uint8)).save(buffer, image_format)
        target.write_bytes(buffer.getvalue())
        originals[buffer.getvalue()] = target.parent.name
    write_shards(str(folder), str(tmp_path / "out"), kind, images_per_shard=5, num_proc=1)
    train = load_shards([str(tmp_path / "out" / f"*{SUFFIX[kind]}")], "--train_files")["train"]
    image_column, label_column = ("jpg", "cls") if kind == "webdataset" else ("image", "label")
    from convnextv2_hf.training.data.sources import undecoded

    rows = list(undecoded(train, image_column))
    back = {row[image_column]["bytes"]: ["a", "b"][row[label_column]] for row in rows}
    assert len(rows) == len(originals) and back == originals
    for data in back:
        Image.open(io.BytesIO(data)).load()


def test_a_shard_set_that_write_shards_did_not_finish_is_refused(shards, tmp_path):
    """A killed write-shards leaves its folder marked unfinished (and maybe a `.partial` shard): refused in one line,
    not trained on without its missing shards and labels. A finished set has no marker."""
    from convnextv2_hf.training.data.shards import UNFINISHED

    complete = shards / "numbered-webdataset"
    assert not (complete / UNFINISHED).exists() and (complete / "classes.json").exists()
    killed = tmp_path / "killed"
    killed.mkdir()
    first = sorted(complete.glob("*.tar"))[0]
    (killed / first.name).write_bytes(first.read_bytes())
    (killed / UNFINISHED).write_text("")  # as a kill leaves it
    result = run_as_user([*PRETRAIN, *shard_args(["--train_files", str(killed / "*.tar")], tmp_path / "o",
                                                 "--max_train_steps", "1")], tmp_path, timeout=120)
    assert_one_line(result, "did not finish", "write it again")
    (killed / UNFINISHED).unlink()
    (killed / "train-00001-of-00004.tar.partial").write_bytes(b"half")
    with pytest.raises(ValueError, match="did not finish"):
        load_shards([str(killed / "*.tar")], "--train_files")


def damaged_shards(shards, root):
    """(name, folder, glob, words of the error) for each kind of damage a copy or a crash leaves in a shard."""
    import io
    import tarfile

    import pyarrow.parquet as pq

    tar = sorted((shards / "numbered-webdataset").glob("*.tar"))[0].read_bytes()
    parquet = sorted((shards / "numbered-parquet").glob("*.parquet"))[0].read_bytes()
    empty_tar = io.BytesIO()
    tarfile.open(fileobj=empty_tar, mode="w").close()
    empty_table = io.BytesIO()
    pq.write_table(pq.read_table(io.BytesIO(parquet)).slice(0, 0), empty_table)
    cases = {"zero-byte.tar": (b"", "empty (0 bytes)"), "truncated.tar": (tar[:1500], "truncated"),
             "garbage.tar": (os.urandom(2048), "not a tar archive"),
             "no-members.tar": (empty_tar.getvalue(), "empty tar archive"),
             "truncated.parquet": (parquet[:-100], "not a readable parquet file"),
             "garbage.parquet": (os.urandom(2048), "not a readable parquet file"),
             "zero-rows.parquet": (empty_table.getvalue(), "holds no rows")}
    for name, (data, words) in cases.items():
        folder = root / name.replace(".", "-")
        folder.mkdir()
        (folder / name).write_bytes(data)
        yield name, folder, str(folder / name), words


def test_damaged_shards_are_refused_in_one_line_naming_the_shard(shards, tmp_path):
    """Empty, truncated, garbage, member-less and zero-row shards are named before training (they used to end in
    tarfile's or pyarrow's own errors, the shard unnamed); two of them through the script, as a user meets them."""
    for name, folder, path, words in damaged_shards(shards, tmp_path):
        with pytest.raises(ValueError, match=re.escape(words)) as raised:
            load_shards([path], "--train_files")
        assert name in str(raised.value) and "write-shards" in str(raised.value)
        if name in ("truncated.tar", "zero-rows.parquet"):
            result = run_as_user([*PRETRAIN, *shard_args(["--train_files", path, "--skip_corrupt_images"],
                                                         tmp_path / f"o-{name}", "--max_train_steps", "1")],
                                 tmp_path, timeout=120)
            assert_one_line(result, name, words)


def test_parquet_with_raw_bytes_or_path_image_columns_trains_and_a_non_image_column_is_named(shards, tmp_path):
    """Parquet made by hand often stores images as a plain binary column or as file paths, not as datasets' Image
    struct: both are images. A column of numbers is not, and the fix is --image_column_name, not removing files."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from convnextv2_hf.training.data.decoding import decode_image

    files = sorted((shards / "numbered").rglob("*.jpg"))
    pq.write_table(pa.table({"image": [f.read_bytes() for f in files], "label": [i % 2 for i in range(len(files))]}),
                   tmp_path / "bytes.parquet")
    pq.write_table(pa.table({"image": [str(f) for f in files]}), tmp_path / "paths.parquet")
    for name in ("bytes", "paths"):
        summary = pretrain(shard_args(["--train_files", str(tmp_path / f"{name}.parquet")], tmp_path / f"run-{name}",
                                      "--max_train_steps", "2", "--dataloader_num_workers", "0"))
        assert summary["completed_steps"] == 2, name
    assert decode_image(files[0].read_bytes()).size == decode_image(str(files[0])).size == (40, 48)
    with pytest.raises(ValueError, match="--image_column_name") as raised:
        decode_image(7)
    assert "Remove the file" not in str(raised.value)


def hand_made_tar(path: Path, formats: list[str]) -> Path:
    """A webdataset tar made as users make them: sample i's image member under its own format's extension."""
    import io
    import tarfile

    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as archive:
        for i, image_format in enumerate(formats):
            encoded = io.BytesIO()
            Image.fromarray(np.full((36, 40 + i, 3), 9 * i, np.uint8)).save(encoded, image_format)
            for name, data in ((f"{i:04d}.{image_format.lower()}", encoded.getvalue()), (f"{i:04d}.cls", b"0")):
                member = tarfile.TarInfo(name)
                member.size = len(data)
                archive.addfile(member, io.BytesIO(data))
    return path


def test_hand_made_webdataset_shards_mixing_image_extensions_are_named_with_the_fix(tmp_path):
    """datasets reads a webdataset's columns from its first samples. Mixed among those, it used to refuse without
    naming the shard; after them, the other images came back as None, reported as a column holding no images
    (with --image_column_name as the fix). Both now name the shard (and sample) and the fix, in one line."""
    cases = {"first": (["JPEG", "PNG"] * 4, "the first samples of shard"),
             "late": (["JPEG"] * 6 + ["PNG"] * 2, "has no .jpeg member")}
    for name, (formats, words) in cases.items():
        shard = hand_made_tar(tmp_path / name / f"{name}.tar", formats)
        result = run_as_user([*PRETRAIN, *shard_args(["--train_files", str(shard)], tmp_path / f"o-{name}",
                                                     "--max_train_steps", "4", "--per_device_train_batch_size", "4",
                                                     "--dataloader_num_workers", "0")], tmp_path, timeout=120)
        assert_one_line(result, words, str(shard), "write-shards")


def test_an_error_in_one_process_of_a_launch_is_said_once_and_named_by_the_launcher(tmp_path):
    """Process 1's shard holds only undecodable images (read first: it is its only shard). It says so in one line;
    process 0, cut off from it mid-step, does not add gloo's 'Connection closed by peer' as a second error; and the
    launcher's summary (with accelerate's --quiet, without its traceback) names that same error as the root cause.
    Two processes on a one-image shard are refused before training, in one line, once."""
    import io
    import tarfile

    numbered = numbered_folder(tmp_path / "numbered", 8)
    write_shards(str(numbered), str(tmp_path / "bad"), "webdataset", images_per_shard=4, num_proc=1)
    second = sorted((tmp_path / "bad").glob("*.tar"))[1]
    with tarfile.open(second) as archive:
        members = [(member, archive.extractfile(member).read()) for member in archive]
    with tarfile.open(second, "w") as archive:
        for member, data in members:
            data = b"not an image" if member.name.endswith(".jpg") else data
            member.size = len(data)
            archive.addfile(member, io.BytesIO(data))
    one = tmp_path / "one-image" / "a"
    one.mkdir(parents=True)
    (one / "00.jpg").write_bytes((numbered / "even" / "00.jpg").read_bytes())
    write_shards(str(one.parent), str(tmp_path / "one"), "webdataset", images_per_shard=4, num_proc=1)
    for name, words in (("bad", "cannot identify image file"), ("one", "1 image(s) for 2 processes")):
        result = run_as_user([*LAUNCH, "--quiet", "--num_processes", "2", "--num_machines", "1", "--main_process_port",
                              free_port(), *PRETRAIN[1:], *shard_args(
                                  ["--train_files", str(tmp_path / name / "*.tar")], tmp_path / f"o-{name}",
                                  "--max_train_steps", "4", "--dataloader_num_workers", "0")], tmp_path, timeout=180)
        errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
        assert result.returncode != 0 and len(errors) == 1 and words in errors[0], result.stderr[-3000:]
        assert "Traceback" not in result.stderr and "Connection closed" not in result.stderr, result.stderr[-3000:]
        root_cause = result.stderr.split("Root Cause")[-1]
        assert words in root_cause, result.stderr[-3000:]
