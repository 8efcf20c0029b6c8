"""Fine-tuning from streams: webdataset and parquet shards made by write-shards (and a local parquet dataset
folder standing in for a hub id with --streaming), their labels, evaluation, an exact resume; and the resumable
stream itself, cut after every batch."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch.utils.data import DataLoader

from conftest import FINETUNE, assert_one_line, launch_two_processes, run_as_user
from convnextv2_hf.training.data.shard_writer import write_shards
from convnextv2_hf.training.data.shards import load_shards
from convnextv2_hf.training.data.streams import KeepsStreamPositions, ResumableStream
from convnextv2_hf.training.finetune import main as finetune
from test_shards import SUFFIX, numbered_folder


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """24 numbered images (width 40 + i, class i % 2) as webdataset and parquet shards of 4."""
    base = tmp_path_factory.mktemp("streamed")
    numbered_folder(base / "numbered", 24)
    for kind in SUFFIX:
        write_shards(str(base / "numbered"), str(base / kind), kind, images_per_shard=4, num_proc=1)
    return base


def files(shards, kind):
    return str(shards / kind / f"*{SUFFIX[kind]}")


def stream_args(source, output_dir, *extra):
    return [*source, "--output_dir", str(output_dir), "--model_preset", "atto", "--image_size", "32",
            "--per_device_train_batch_size", "4", "--learning_rate", "2e-3", "--num_train_epochs", "2",
            "--logging_steps", "1", "--report_to", "none", "--seed", "0", "--dataloader_num_workers", "2", *extra]


class Widths(ResumableStream):
    """Each sample is its image's width (which names the image)."""

    def sample(self, row, generator, index, epoch):
        return {"width": torch.tensor(row["jpg" if "jpg" in row else "image"].width)}


def widths_of(batches):
    return [batch["width"].tolist() for batch in batches]


@pytest.mark.parametrize("endless", [False, True])
def test_a_stream_cut_after_any_batch_resumes_in_the_uninterrupted_order(shards, endless):
    """Two workers of unequal parts (6 shards: 3 each, 11 batches of 2 a pass): cut after every batch, the resumed
    loader's batches are the uninterrupted loader's, in order; an endless stream goes on into the next epoch."""
    train = load_shards([files(shards, "webdataset")], "--train_files")["train"]

    def loader(stream):
        return DataLoader(stream, batch_size=2, num_workers=2, collate_fn=KeepsStreamPositions(
            lambda examples: {"width": torch.stack([e["width"] for e in examples])}))

    def new_stream():
        stream = Widths(train, seed=3)
        stream.endless = endless
        return stream

    total = 16 if endless else 12
    full = widths_of(batch for batch, _ in zip(loader(new_stream()), range(total)))
    assert sorted(w for batch in full[:12] for w in batch) == [40 + i for i in range(24)]
    for cut in range(1, total - 1):
        first = new_stream()
        for batch, _ in zip(loader(first), range(cut)):
            first.record(batch["stream_position"])
        resumed = new_stream()
        resumed.resume_at(first.progress(2), 2)
        rest = widths_of(batch for batch, _ in zip(loader(resumed), range(total - cut)))
        assert rest == full[cut:], f"cut after batch {cut}"


def test_a_resumed_stream_does_not_open_the_shards_it_had_finished(shards, monkeypatch):
    """6 shards of 4 (sizes from write-shards' record), one reader: cut after 3 batches of 4, the resumed stream
    opens only the 3 shards left and yields the uninterrupted stream's images."""
    from convnextv2_hf.training.data import streams
    from convnextv2_hf.training.data.shards import expand_shard_patterns, shard_row_counts

    builder, paths = expand_shard_patterns([files(shards, "parquet")], "--train_files")
    sizes = shard_row_counts(paths, builder, count_missing=False)
    assert sizes == [4] * 6
    train = load_shards([files(shards, "parquet")], "--train_files")["train"]
    opened, read = [], streams.rows_of
    monkeypatch.setattr(streams, "rows_of", lambda stream: opened.append(stream) or read(stream))

    def loader(stream):
        return DataLoader(stream, batch_size=4, collate_fn=KeepsStreamPositions(
            lambda examples: {"width": torch.stack([e["width"] for e in examples])}))

    full = widths_of(loader(Widths(train, seed=1, shard_sizes=sizes)))
    first = Widths(train, seed=1, shard_sizes=sizes)
    for batch, _ in zip(loader(first), range(3)):
        first.record(batch["stream_position"])
    resumed = Widths(train, seed=1, shard_sizes=sizes)
    resumed.resume_at(first.progress(0), 0)
    opened.clear()
    assert widths_of(loader(resumed)) == full[3:] and len(opened) == 3


@pytest.mark.parametrize("kind", list(SUFFIX))
def test_fine_tunes_from_shards_with_their_labels(shards, tmp_path, kind):
    out = tmp_path / kind
    metrics = finetune(stream_args(["--train_files", files(shards, kind), "--validation_files", files(shards, kind)],
                                   out))
    assert 0.0 <= metrics["eval_top1_accuracy"] <= 1.0
    config = json.loads((out / "config.json").read_text())
    assert config["id2label"] == {"0": "even", "1": "odd"}
    history = json.loads((out / "log_history.json").read_text())
    assert max(h["step"] for h in history) == 12  # 2 passes of 24 images in batches of 4
    assert [h["epoch"] for h in history if "eval_loss" in h][:2] == [1.0, 2.0]  # evaluated after each pass
    assert "24 training and 24 evaluation images, 2 classes, streamed" in (out / "README.md").read_text()


def test_a_validation_folder_beside_shards_and_a_hub_style_dataset_streamed(shards, tmp_path):
    metrics = finetune(stream_args(["--train_files", files(shards, "parquet"), "--validation_dir",
                                    str(shards / "numbered")], tmp_path / "folder", "--num_train_epochs", "1"))
    assert "eval_top1_accuracy" in metrics
    # a local dataset folder in the hub's layout stands in for a hub id (no network here)
    hub = tmp_path / "hub-copy" / "data"
    hub.mkdir(parents=True)
    for shard in (shards / "parquet").glob("*.parquet"):
        shutil.copy(shard, hub / shard.name)
        shutil.copy(shard, hub / shard.name.replace("train-", "validation-"))
    out = tmp_path / "hub"
    metrics = finetune(stream_args(["--dataset_name", str(hub.parent), "--streaming"], out, "--max_steps", "3"))
    assert "eval_top1_accuracy" in metrics
    assert json.loads((out / "config.json").read_text())["id2label"] == {"0": "even", "1": "odd"}


@pytest.mark.slow
@pytest.mark.parametrize("mixing", [[], ["--mixup", "0.8", "--cutmix", "1.0"]], ids=["plain", "mixup"])
def test_a_streamed_run_resumed_from_a_checkpoint_ends_with_the_same_weights(shards, tmp_path, mixing):
    """14 steps over 2 workers (steps 5 and 8 from different workers), checkpointed at 5 in the middle of the first
    pass; resumed from that checkpoint in a new folder (as after a kill), losses and weights are the
    uninterrupted run's."""
    source = ["--train_files", files(shards, "webdataset"), "--validation_files", files(shards, "webdataset")]
    common = ["--max_steps", "14", "--drop_path_rate", "0.1", "--model_ema", *mixing]
    full = tmp_path / "full"
    finetune(stream_args(source, full, *common, "--save_strategy", "steps", "--save_steps", "5"))
    kept = tmp_path / "kept" / "checkpoint-5"
    shutil.copytree(full / "checkpoint-5", kept)
    assert json.loads((kept / "stream_positions.json").read_text())[0][0] == 1  # the next batch: worker 1's
    resumed = tmp_path / "resumed"
    finetune(stream_args(source, resumed, *common, "--save_strategy", "no", "--resume_from_checkpoint", str(kept)))

    def losses(folder):
        return [(h["step"], h["loss"]) for h in json.loads((folder / "log_history.json").read_text()) if "loss" in h]

    assert [step for step, _ in losses(resumed)] == list(range(1, 15))  # steps 1-5 from the checkpoint's history
    assert [loss for _, loss in losses(resumed)] == pytest.approx([loss for _, loss in losses(full)], rel=1e-5)
    for weights in ("model.safetensors", "ema/model.safetensors"):
        a, b = load_file(str(full / weights)), load_file(str(resumed / weights))
        assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a), weights


def test_streamed_fine_tuning_refusals_are_one_line(shards, tmp_path):
    unlabelled = tmp_path / "unlabelled"
    (unlabelled / "images").mkdir(parents=True)
    for image in (shards / "numbered" / "even").iterdir():
        shutil.copy(image, unlabelled / "images" / image.name)
    write_shards(str(unlabelled), str(tmp_path / "unlabelled-shards"), "webdataset", images_per_shard=4, num_proc=1)
    nameless = tmp_path / "nameless"
    shutil.copytree(shards / "webdataset", nameless)
    (nameless / "classes.json").unlink()
    train = ["--train_files", files(shards, "webdataset")]
    for source, extra, words in [
        (["--train_files", str(tmp_path / "unlabelled-shards" / "*.tar")], ["--validation_dir", str(shards / "numbered")],
         ["no labels", "write-shards"]),
        (["--train_files", str(nameless / "*.tar")], ["--validation_files", files(shards, "webdataset")],
         ["classes.json"]),
        (train, [], ["no held-out split", "--validation_files"]),
        (train, ["--validation_files", files(shards, "webdataset"), "--max_train_samples", "8"],
         ["--max_train_samples", "stream"]),
    ]:
        result = run_as_user([*FINETUNE, *stream_args(source, tmp_path / "o", *extra)], tmp_path, timeout=180)
        assert_one_line(result, *words)
    assert not Path(tmp_path / "o" / "model.safetensors").exists()


@pytest.mark.slow
def test_two_processes_fine_tune_from_their_own_parts_and_record_both(shards, tmp_path):
    """Each process trains on its own parts and evaluates its own part of the validation shards (the sums are
    reduced): evaluated before training, the two processes' loss and accuracy over all 24 images are one process's.
    (That one reads without workers: its batches are then all full. The Trainer's own loop counts a partial batch's
    loss as a full one, which moved its mean by 3e-5 here.)"""
    def args(out):
        return stream_args(["--train_files", files(shards, "parquet"), "--validation_files", files(shards, "parquet")],
                           out, "--max_steps", "3", "--save_strategy", "steps", "--save_steps", "3",
                           "--eval_on_start", "true")

    launch_two_processes(FINETUNE[1], args(tmp_path / "two"))
    saved = json.loads((tmp_path / "two" / "checkpoint-3" / "stream_positions.json").read_text())
    # 6 shards, 2 processes x 2 workers: each worker its own shards; 3 steps of 4 images per process
    assert len(saved) == 2 and all(len(part) == 5 and part[0] == 1 for part in saved)
    assert "eval_top1_accuracy" in json.loads((tmp_path / "two" / "all_results.json").read_text())
    finetune([*args(tmp_path / "one"), "--dataloader_num_workers", "0"])
    first = [next(h for h in json.loads((tmp_path / run / "log_history.json").read_text()) if "eval_loss" in h)
             for run in ("one", "two")]
    assert first[0]["eval_loss"] == pytest.approx(first[1]["eval_loss"], rel=1e-6)
    assert first[0]["eval_top1_accuracy"] == pytest.approx(first[1]["eval_top1_accuracy"], abs=1e-9)


def test_each_process_evaluates_its_own_part_of_a_stream(shards):
    """The parts of the validation stream (whole shards, or every other row of a stream cut to 7 images) hold every
    image once between them."""
    from transformers import ConvNextImageProcessor

    from convnextv2_hf.training.data.labelled_streams import StreamedEvaluationDataset

    stream = load_shards([files(shards, "parquet")], "--validation_files")["train"]
    processor = ConvNextImageProcessor(size={"shortest_edge": 32})
    for rows, expected in ((stream, 24), (stream.take(7), 7)):
        parts = [[round(float(sample["pixel_values"].mean()), 4) for sample in DataLoader(
            StreamedEvaluationDataset(rows, "image", "label", processor, False, rank=rank, world=2),
            batch_size=None, num_workers=2)] for rank in range(2)]
        assert len(parts[0]) + len(parts[1]) == expected and len(set(parts[0] + parts[1])) == expected
