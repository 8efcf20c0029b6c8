"""End-to-end tests of the FCMAE pre-training script on a small generated image folder."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import (FSDP_LAUNCH, FSDP_ON_CPU, TINY_OVERRIDES as TINY, launch_as_two_machines, launch_two_processes,
                      make_image_folder)
from convnextv2_hf.training.arguments import parse_config_overrides
from convnextv2_hf.training.checkpoints import find_checkpoint
from convnextv2_hf.training.pretrain import main as pretrain

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "examples" / "pretraining" / "run_fcmae.py"


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("images"))


def tiny_args(images, output_dir, *extra):
    return ["--train_dir", str(images), "--output_dir", str(output_dir), "--config_overrides", TINY,
            "--image_size", "32", "--per_device_train_batch_size", "4", "--learning_rate", "1e-3",
            "--num_warmup_steps", "1", "--sparse_grn_scope", "sample", "--seed", "3", *extra]


def history(output_dir):
    return json.loads((Path(output_dir) / "train_results.json").read_text())["loss_history"]


def test_end_to_end_on_messy_images(images, tmp_path):
    out = tmp_path / "run"
    summary = pretrain(tiny_args(images, out, "--max_train_steps", "4", "--skip_corrupt_images", "--with_tracking",
                                 "--checkpointing_steps", "2"))
    assert summary["skipped_images"] == 1 and summary["completed_steps"] == 4
    for name in ("model.safetensors", "config.json", "preprocessor_config.json", "README.md", "loss_curve.png",
                 "reconstructions.png", "train_results.json", "modeling_convnextv2.py"):
        assert (out / name).exists(), name
    assert (out / "checkpoint-2").is_dir() and (out / "checkpoint-4").is_dir()
    assert list(out.glob("fcmae/events.out.tfevents.*")), "TensorBoard events"
    card = (out / "README.md").read_text()
    assert "fcmae" in card and "reconstructions.png" in card
    losses = [loss for _, loss in history(out)]
    assert len(losses) == 4 and all(loss > 0 for loss in losses)


def test_corrupt_image_fails_naming_its_path(images, tmp_path):
    with pytest.raises(ValueError, match="broken.png"):
        pretrain(tiny_args(images, tmp_path / "run", "--max_train_steps", "20"))


def test_resume_continues_the_same_loss_trajectory(images, tmp_path):
    full = tmp_path / "full"
    # 12 readable images, batch 4: 3 steps per epoch, so checkpoint-4 is in the middle of the second epoch
    pretrain(tiny_args(images, full, "--max_train_steps", "7", "--skip_corrupt_images", "--checkpointing_steps", "4"))
    resumed, kept = tmp_path / "resumed", tmp_path / "kept" / "checkpoint-4"
    os.renames(full / "checkpoint-4", kept)  # a checkpoint moved elsewhere, resumed into a new folder
    pretrain(tiny_args(images, resumed, "--max_train_steps", "7", "--skip_corrupt_images",
                       "--resume_from_checkpoint", str(kept)))
    expected, got = history(full), history(resumed)
    assert [step for step, _ in got] == [1, 2, 3, 4, 5, 6, 7]
    for (_, a), (_, b) in zip(expected, got):
        assert a == pytest.approx(b, rel=1e-5)


def test_two_processes_with_half_batch_match_one_process(images, tmp_path):
    """With tracking too: the trackers end, and the process group closes, only after the final model is saved."""
    common = tiny_args(images, tmp_path / "one", "--max_train_steps", "3", "--skip_corrupt_images")
    pretrain(common)
    two = tmp_path / "two"
    args = tiny_args(images, two, "--max_train_steps", "3", "--skip_corrupt_images", "--with_tracking")
    args[args.index("--per_device_train_batch_size") + 1] = "2"
    result = launch_two_processes(SCRIPT, args)
    assert "total batch 4" in result.stdout and "destroy_process_group" not in result.stderr
    assert list(two.glob("fcmae/events.out.tfevents.*")) and (two / "model.safetensors").is_file()
    for (_, a), (_, b) in zip(history(tmp_path / "one"), history(two)):
        assert a == pytest.approx(b, rel=1e-4)


@pytest.mark.slow
def test_two_machines_over_gloo_match_one_process_and_resume(images, tmp_path):
    """Two machines of one process each (`--num_machines 2 --machine_rank R`, here on one host), batch 2 each: the
    losses of one process at batch 4; their checkpoint resumes on the same two machines."""
    pretrain(tiny_args(images, tmp_path / "one", "--max_train_steps", "3", "--skip_corrupt_images"))
    two = tmp_path / "two"
    args = tiny_args(images, two, "--max_train_steps", "3", "--skip_corrupt_images", "--checkpointing_steps", "2")
    args[args.index("--per_device_train_batch_size") + 1] = "2"
    assert "total batch 4" in launch_as_two_machines(SCRIPT, args)[0]
    for (_, a), (_, b) in zip(history(tmp_path / "one"), history(two), strict=True):
        assert a == pytest.approx(b, rel=1e-4)
    args[args.index("--max_train_steps") + 1] = "4"
    launch_as_two_machines(SCRIPT, [*args, "--resume_from_checkpoint", "latest"])
    assert [step for step, _ in history(two)] == [1, 2, 3, 4]


def test_fsdp2_on_two_processes_matches_one_process_and_resumes(images, tmp_path):
    """FSDP2 over two CPU processes (blocks as shard units, sharded checkpoints), batch 2 each: the losses and final
    weights of one process at batch 4, and again when resumed from its sharded step-2 checkpoint."""
    pretrain(tiny_args(images, tmp_path / "one", "--max_train_steps", "4", "--skip_corrupt_images"))
    sharded = tmp_path / "fsdp"
    args = tiny_args(images, sharded, "--max_train_steps", "4", "--skip_corrupt_images", "--checkpointing_steps", "2")
    args[args.index("--per_device_train_batch_size") + 1] = "2"
    result = launch_two_processes(FSDP_ON_CPU, [str(SCRIPT), *args], launch=FSDP_LAUNCH)
    assert "asks for FSDP" not in result.stderr and "total batch 4" in result.stdout
    assert {"pytorch_model_fsdp_0", "optimizer_0"} <= {p.name for p in (sharded / "checkpoint-2").iterdir()}
    assert_same_run(tmp_path / "one", sharded)
    resumed = launch_two_processes(FSDP_ON_CPU, [str(SCRIPT), *args, "--resume_from_checkpoint",
                                                 str(sharded / "checkpoint-2")], launch=FSDP_LAUNCH)
    assert "at step 2" in resumed.stdout
    assert_same_run(tmp_path / "one", sharded)


def assert_same_run(expected, found) -> None:
    """Same losses step by step (their changes here are ~1e-4 a step) and same final weights."""
    from safetensors.torch import load_file

    for (step_a, a), (step_b, b) in zip(history(expected), history(found), strict=True):
        assert step_a == step_b and a == pytest.approx(b, rel=1e-5, abs=0)
    whole, other = load_file(Path(expected, "model.safetensors")), load_file(Path(found, "model.safetensors"))
    assert whole.keys() == other.keys()
    for key in whole:
        torch.testing.assert_close(other[key], whole[key], rtol=1e-4, atol=1e-5)


def test_kill_minus_nine_leaves_loadable_checkpoints(images, tmp_path):
    out = tmp_path / "killed"
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    process = subprocess.Popen(
        [sys.executable, str(SCRIPT), *tiny_args(images, out, "--max_train_steps", "500", "--skip_corrupt_images",
                                                 "--checkpointing_steps", "1")],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 120
    while time.time() < deadline and len(list(out.glob("checkpoint-*"))) < 3:
        time.sleep(0.2)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert list(out.glob("checkpoint-*")), "no checkpoint was written before the kill"
    latest = find_checkpoint(str(out), "latest")
    steps = json.loads(Path(latest, "training_state.json").read_text())["completed_steps"]
    summary = pretrain(tiny_args(images, out, "--max_train_steps", str(steps + 1), "--skip_corrupt_images",
                                 "--resume_from_checkpoint", "latest"))
    assert summary["completed_steps"] == steps + 1


def test_errors_before_training(images, tmp_path, monkeypatch):
    empty = tmp_path / "empty" / "only"
    empty.mkdir(parents=True)
    for index in range(4):
        (empty / f"bad{index}.png").write_bytes(b"not an image")
    with pytest.raises(ValueError, match="None of the 4 training images can be read"):
        pretrain(tiny_args(empty.parent, tmp_path / "o1", "--max_train_steps", "1", "--skip_corrupt_images"))
    with pytest.raises(ValueError, match="--image_column_name 'photo' not found"):
        pretrain(tiny_args(images, tmp_path / "o2", "--max_train_steps", "1", "--image_column_name", "photo"))
    with pytest.raises(ValueError, match="multiple of the mask cell"):
        pretrain(tiny_args(images, tmp_path / "o3", "--max_train_steps", "1", "--image_size", "40"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(RuntimeError, match="HF_HUB_OFFLINE"):
        pretrain(tiny_args(images, tmp_path / "o4", "--max_train_steps", "1", "--push_to_hub"))
    assert not (tmp_path / "o4").exists()
    with pytest.raises(RuntimeError, match="--train_dir"):
        pretrain(["--dataset_name", "someone/not-cached-anywhere", "--output_dir", str(tmp_path / "o5")])


def test_config_overrides_parsing():
    assert parse_config_overrides("depths=[1,1,3,1],patch_size=2,hidden_act=gelu") == {
        "depths": [1, 1, 3, 1], "patch_size": 2, "hidden_act": "gelu"}
    with pytest.raises(ValueError, match="key=value"):
        parse_config_overrides("oops")


def test_mixmae_pretraining_single_and_two_processes(images, tmp_path):
    summary = pretrain(tiny_args(images, tmp_path / "mix1", "--max_train_steps", "2", "--skip_corrupt_images",
                                 "--mask_strategy", "mixmae"))
    assert summary["completed_steps"] == 2
    config = json.loads((tmp_path / "mix1" / "config.json").read_text())
    assert config["mask_strategy"] == "mixmae"
    args = tiny_args(images, tmp_path / "mix2", "--max_train_steps", "2", "--skip_corrupt_images", "--mask_strategy", "mixmae")
    args[args.index("--per_device_train_batch_size") + 1] = "2"
    assert "total batch 4" in launch_two_processes(SCRIPT, args).stdout
    assert all(loss > 0 for _, loss in history(tmp_path / "mix2"))
