"""Nothing lost, nothing silently wrong: killed and resumed runs, output folders owned by one run, full disks,
checks before training, and inputs that used to be misread."""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from conftest import REPO, TINY_OVERRIDES, make_image_folder, user_env, write_photo
from convnextv2_hf import ConvNextV2ImageProcessor
from convnextv2_hf.outputs.staging import CheckpointWriteError
from convnextv2_hf.outputs.staging import complete_checkpoints
from convnextv2_hf.training.checkpoints import NonFiniteLossError
from convnextv2_hf.training.finetune import main as finetune
from convnextv2_hf.outputs.output_dir import LOCK_NAME, OutputDirError, OutputDirLock, check_output_dir
from convnextv2_hf.training.pretrain import main as pretrain

FINETUNE_SCRIPT = REPO / "examples" / "classification" / "run_finetune.py"


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("images"), per_class=8, corrupt=False)


def pretrain_args(images, out, *extra):
    return ["--train_dir", str(images), "--output_dir", str(out), "--config_overrides", TINY_OVERRIDES,
            "--image_size", "32", "--per_device_train_batch_size", "4", "--learning_rate", "1e-3",
            "--num_warmup_steps", "1", "--sparse_grn_scope", "sample", *extra]


def finetune_args(images, out, *extra):
    return ["--train_dir", str(images), "--output_dir", str(out), "--config_overrides", TINY_OVERRIDES,
            "--image_size", "32", "--per_device_train_batch_size", "4", "--num_train_epochs", "3",
            "--learning_rate", "1e-3", "--warmup_steps", "1", "--logging_steps", "1", "--save_strategy", "steps",
            "--save_steps", "1", "--eval_strategy", "no", "--report_to", "none", "--train_val_split", "0.25",
            "--model_ema", "--model_ema_decay", "0.9", "--drop_path_rate", "0.2", "--mixup", "0.8", "--cutmix", "1.0",
            "--disable_tqdm", "true", *extra]


def losses(out):
    return {h["step"]: h["loss"] for h in json.loads(Path(out, "log_history.json").read_text()) if "loss" in h}


def start(args):
    return subprocess.Popen([sys.executable, str(FINETUNE_SCRIPT), *args], env=user_env(), stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=REPO)


def kill_when(process, condition, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline and process.poll() is None and not condition():
        time.sleep(0.001)
    assert process.poll() is None, "the run finished before it could be killed"
    process.send_signal(signal.SIGKILL)
    process.wait()


@pytest.mark.slow
def test_killed_finetuning_resumes_to_the_uninterrupted_run(images, tmp_path):
    full, killed = tmp_path / "full", tmp_path / "killed"
    finetune(finetune_args(images, full))
    # 1: killed while a checkpoint is being written (its staging folder exists)
    run = start(finetune_args(images, killed))
    kill_when(run, lambda: len(complete_checkpoints(killed, "trainer_state.json")) >= 2
              and (killed / ".tmp-trainer").exists())
    assert not [p for p in killed.glob("checkpoint-*") if not (p / "trainer_state.json").exists()]
    # 2: resumed, then killed at a random moment after a new checkpoint
    done = len(complete_checkpoints(killed, "trainer_state.json"))
    run = start(finetune_args(images, killed, "--resume_from_checkpoint", "latest"))
    pause = random.Random(0).uniform(0.0, 0.3)
    kill_when(run, lambda: len(list(killed.glob("checkpoint-*"))) > done and time.sleep(pause) is None)
    # 3: resumed to the end
    result = subprocess.run([sys.executable, str(FINETUNE_SCRIPT), *finetune_args(
        images, killed, "--resume_from_checkpoint", "latest")], env=user_env(), stdin=subprocess.DEVNULL,
        capture_output=True, text=True, timeout=300, cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    assert losses(killed) == pytest.approx(losses(full), rel=1e-5)
    for weights in ("model.safetensors", "ema/model.safetensors"):
        a, b = load_file(str(full / weights)), load_file(str(killed / weights))
        assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a), weights


def test_finished_runs_are_left_alone_when_resumed(images, tmp_path):
    out = tmp_path / "ft"
    first = finetune(finetune_args(images, out, "--num_train_epochs", "1", "--save_steps", "100"))
    written = (out / "all_results.json").stat().st_mtime_ns
    again = finetune(finetune_args(images, out, "--num_train_epochs", "1", "--resume_from_checkpoint", "latest"))
    assert again == json.loads((out / "all_results.json").read_text())
    assert (out / "all_results.json").stat().st_mtime_ns == written and first["eval_loss"] == again["eval_loss"]
    pre = tmp_path / "pre"
    pretrain(pretrain_args(images, pre, "--max_train_steps", "2", "--checkpointing_steps", "2"))
    written = (pre / "train_results.json").stat().st_mtime_ns
    summary = pretrain(pretrain_args(images, pre, "--max_train_steps", "2", "--resume_from_checkpoint", "latest"))
    assert summary["completed_steps"] == 2 and (pre / "train_results.json").stat().st_mtime_ns == written


def test_an_output_folder_belongs_to_one_run(images, tmp_path):
    out = tmp_path / "run"
    pretrain(pretrain_args(images, out, "--max_train_steps", "1"))
    for again in (lambda: pretrain(pretrain_args(images, out, "--max_train_steps", "1")),
                  lambda: finetune(finetune_args(images, out, "--num_train_epochs", "1"))):
        with pytest.raises(OutputDirError, match="already holds a model or checkpoints"):
            again()
    pretrain(pretrain_args(images, out, "--max_train_steps", "1", "--overwrite_output_dir"))
    # a live run's lock stops a second one; a dead run's lock is taken over
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (tmp_path / "busy").mkdir()
        (tmp_path / "busy" / LOCK_NAME).write_text(json.dumps({"pid": sleeper.pid, "host": os.uname().nodename}))
        with pytest.raises(OutputDirError, match=f"in use by another run \\(process {sleeper.pid}\\)"):
            pretrain(pretrain_args(images, tmp_path / "busy", "--max_train_steps", "1"))
    finally:
        sleeper.kill()
        sleeper.wait()
    pretrain(pretrain_args(images, tmp_path / "busy", "--max_train_steps", "1"))  # the lock is stale now
    assert not (tmp_path / "busy" / LOCK_NAME).exists()


def test_unusable_output_folders_fail_before_any_work(tmp_path):
    with pytest.raises(OutputDirError, match="Cannot write to --output_dir '/sys/convnextv2-hf-test'"):
        check_output_dir("/sys/convnextv2-hf-test", "--output_dir")
    with pytest.raises(OutputDirError, match="MiB free but one checkpoint needs about"):
        check_output_dir(tmp_path, "--output_dir", needed_bytes=2**60)
    with OutputDirLock(tmp_path):
        assert (tmp_path / LOCK_NAME).exists()
    assert not (tmp_path / LOCK_NAME).exists()


def test_full_disk_at_a_checkpoint_keeps_the_last_good_one(images, tmp_path, monkeypatch):
    import accelerate

    out, original, calls = tmp_path / "pre", accelerate.Accelerator.save_state, []

    def failing_save_state(self, path, *args, **kwargs):
        calls.append(path)
        if len(calls) == 2:
            raise RuntimeError("[enforce fail at inline_container.cc:672] unexpected pos 512 vs 426")
        return original(self, path, *args, **kwargs)

    monkeypatch.setattr(accelerate.Accelerator, "save_state", failing_save_state)
    with pytest.raises(CheckpointWriteError, match="Could not write checkpoint-2 .*: the disk is full.*checkpoint-1"):
        pretrain(pretrain_args(images, out, "--max_train_steps", "4", "--checkpointing_steps", "1"))
    assert [p.name for p in complete_checkpoints(out, "training_state.json")] == ["checkpoint-1"]
    assert not list(out.glob(".tmp-*"))


def test_full_disk_at_a_finetuning_checkpoint_keeps_the_last_good_one(images, tmp_path, monkeypatch):
    from transformers import Trainer

    original, calls = Trainer._save_optimizer_and_scheduler, []

    def failing(self, output_dir):
        calls.append(output_dir)
        if len(calls) == 3:
            raise OSError(28, "No space left on device")
        return original(self, output_dir)

    monkeypatch.setattr(Trainer, "_save_optimizer_and_scheduler", failing)
    with pytest.raises(CheckpointWriteError, match="checkpoint-3 .*the disk is full.*checkpoint-2"):
        finetune(finetune_args(images, tmp_path / "ft"))
    assert [p.name for p in complete_checkpoints(tmp_path / "ft", "trainer_state.json")] == ["checkpoint-1",
                                                                                            "checkpoint-2"]


def test_nan_pixels_stop_pretraining_and_keep_the_previous_checkpoint(images, tmp_path, monkeypatch):
    from convnextv2_hf.training.loops import fcmae

    original, calls = fcmae.normalize_pixels, []

    def nan_after_two_steps(pixels, mean, std):  # the batch as the model gets it, normalised on the device
        calls.append(1)
        normalised = original(pixels, mean, std)
        return normalised.fill_(float("nan")) if len(calls) > 2 else normalised

    monkeypatch.setattr(fcmae, "normalize_pixels", nan_after_two_steps)
    out = tmp_path / "nan"
    with pytest.raises(NonFiniteLossError, match=r"became nan at step 3.*checkpoint-2"):
        pretrain(pretrain_args(images, out, "--max_train_steps", "6", "--checkpointing_steps", "1",
                               "--dataloader_num_workers", "0"))
    newest = complete_checkpoints(out, "training_state.json")[-1]
    assert newest.name == "checkpoint-2"
    weights = load_file(str(newest / "model.safetensors"))
    assert all(torch.isfinite(t).all() for t in weights.values())


def test_checkpoint_rotation_keeps_the_newest_complete_ones(images, tmp_path):
    out = tmp_path / "rot"
    pretrain(pretrain_args(images, out, "--max_train_steps", "5", "--checkpointing_steps", "1",
                           "--checkpoints_total_limit", "2"))
    assert [p.name for p in complete_checkpoints(out, "training_state.json")] == ["checkpoint-4", "checkpoint-5"]


def test_validation_split_gives_a_reconstruction_loss_per_epoch(images, tmp_path):
    validation = make_image_folder(tmp_path / "val", per_class=2, corrupt=False)
    out = tmp_path / "pre"
    summary = pretrain(pretrain_args(images, out, "--validation_dir", str(validation), "--num_train_epochs", "2",
                                     "--with_tracking"))
    assert len(summary["validation_loss"]) == 2 and all(np.isfinite(v) for _, v in summary["validation_loss"])
    assert "validation loss" in (out / "README.md").read_text()


def test_checks_and_counts_before_training(images, tmp_path):
    folder = make_image_folder(tmp_path / "mixed", per_class=4, corrupt=False)
    (folder / "cats" / "notes.txt").write_text("not an image")
    (folder / "labels.csv").write_text("x")
    summary = pretrain(pretrain_args(folder, tmp_path / "a", "--max_train_steps", "1"))
    assert summary["ignored_files"] == 2
    (folder / "metadata.csv").write_text("file_name,text\ncats/0.png,a cat\n")
    with pytest.raises(ValueError, match="metadata.csv, which would restrict"):
        pretrain(pretrain_args(folder, tmp_path / "b", "--max_train_steps", "1"))
    summary = pretrain(pretrain_args(folder, tmp_path / "c", "--max_train_steps", "1", "--ignore_metadata"))
    assert summary["completed_steps"] == 1
    from datasets import load_dataset  # noqa: F401  (imagefolder itself would have read only one image)
    with pytest.raises(ValueError, match="more than the decompression guard allows"):
        pretrain(pretrain_args(images, tmp_path / "d", "--max_train_steps", "1", "--max_image_pixels", "1000"))


def test_one_decoder_turns_photos_upright_as_the_pipeline_does(tmp_path):
    from transformers.image_utils import load_image

    from convnextv2_hf.training.data.decoding import decode_image

    photo = write_photo(tmp_path / "photo.jpg", size=(120, 80), orientation=6)  # stored landscape, shown portrait
    ours = decode_image({"path": str(photo), "bytes": None})
    theirs = load_image(str(photo))
    assert ours.size == theirs.size == (80, 120)
    assert np.array_equal(np.asarray(ours), np.asarray(theirs.convert("RGB")))


def test_typed_overrides_and_counts(images, tmp_path):
    summary = pretrain(pretrain_args(images, tmp_path / "typed", "--max_train_steps", "1", "--config_overrides",
                                     TINY_OVERRIDES + ",use_grn=False,norm_pix_loss=false"))
    config = json.loads((tmp_path / "typed" / "config.json").read_text())
    assert config["use_grn"] is False and summary["completed_steps"] == 1
    assert not any("grn" in k for k in load_file(str(tmp_path / "typed" / "model.safetensors")))


def test_processor_inputs_that_used_to_be_misread():
    processor = ConvNextV2ImageProcessor(size={"shortest_edge": 32})
    rng = np.random.default_rng(0)
    as_uint8 = rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)
    expected = processor(as_uint8, return_tensors="pt")["pixel_values"]
    rescaled = processor(as_uint8.astype(np.float32) / 255, return_tensors="pt")["pixel_values"]  # already in [0, 1]
    torch.testing.assert_close(rescaled, expected)
    assert processor(torch.from_numpy(as_uint8.astype(np.float32)), return_tensors="pt")["pixel_values"].shape == (1, 3, 32, 32)
    for bad, message in ((np.full((8, 8, 3), -3, dtype=np.int32), "0..65535"),
                         (np.full((8, 8, 3), 70000, dtype=np.int64), "0..65535"),
                         (np.full((8, 8, 3), -1.5, dtype=np.float32), "normalised already")):
        with pytest.raises(ValueError, match=message):
            processor(bad)
    with pytest.raises(ValueError, match="aspect ratio beyond 64:1"):
        processor(Image.new("RGB", (60000, 1)))


def test_a_resume_on_another_number_of_processes_is_refused(tmp_path):
    """Two processes' checkpoint resumed by one used to run on, following neither learning-rate schedule."""
    from convnextv2_hf.training.loops.fcmae import check_same_processes

    for rank in range(2):
        (tmp_path / f"random_states_{rank}.pkl").write_bytes(b"")
    check_same_processes(str(tmp_path), 2)
    with pytest.raises(ValueError, match=r"written by 2 process\(es\), this run has 1.*--num_processes 2"):
        check_same_processes(str(tmp_path), 1)
