"""A command deletes or replaces only what it can prove it wrote: user files beside our outputs, the source of a
conversion or export, and images a demo is pointed at stay byte-identical (issue 21's data-loss cases)."""

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import (CLI, FINETUNE, PRETRAIN, TINY_OVERRIDES, assert_ok, assert_one_line, make_image_folder, perturbed,
                      run_as_user, tiny_config)
from convnextv2_hf import ConvNextV2ForImageClassification
from convnextv2_hf.convert_convnextv2 import export_checkpoint
from convnextv2_hf.outputs.manifest import MANIFEST_NAME


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` (our manifest aside), by relative path."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != MANIFEST_NAME}


def user_files(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "notes.md").write_text("my notes\n")
    Image.fromarray(np.full((20, 30, 3), 90, np.uint8)).save(folder / "holiday.jpg")
    (folder / "photos").mkdir(exist_ok=True)
    (folder / "photos" / "a.txt").write_text("a")
    return folder


def test_convert_into_a_folder_holding_the_source_keeps_everything(tmp_path):
    folder = user_files(tmp_path / "p")
    export_checkpoint(perturbed(ConvNextV2ForImageClassification(tiny_config())), "reference", folder / "ref.pth")
    before = snapshot(folder)
    result = run_as_user([*CLI, "convert", "--from", "reference", "--checkpoint", "ref.pth", "--output_dir", "."],
                         tmp_path, cwd=folder)
    assert result.returncode == 0, result.stderr[-2000:]
    after = snapshot(folder)
    assert {k: after[k] for k in before} == before
    assert (folder / "model.safetensors").is_file()
    # converting again with --overwrite_output_dir replaces our model, and still nothing of the user's
    again = run_as_user([*CLI, "convert", "--from", "reference", "--checkpoint", "ref.pth", "--output_dir", ".",
                         "--overwrite_output_dir"], tmp_path, cwd=folder)
    assert again.returncode == 0, again.stderr[-2000:]
    assert {k: v for k, v in snapshot(folder).items() if k in before} == before


def test_convert_refuses_to_write_over_its_own_input(tmp_path):
    source = tmp_path / "hf"
    ConvNextV2ForImageClassification(tiny_config()).save_pretrained(source)
    before = snapshot(source)
    for output in (source, source.parent / "hf"):
        result = run_as_user([*CLI, "convert", "--from", "transformers", "--checkpoint", str(source), "--output_dir",
                              str(output), "--overwrite_output_dir"], tmp_path)
        assert_one_line(result, "--checkpoint", "overwritten")
    assert snapshot(source) == before


def test_export_never_overwrites_the_model_it_reads_or_a_users_file(tmp_path):
    model = tmp_path / "M"
    perturbed(ConvNextV2ForImageClassification(tiny_config())).save_pretrained(model)
    before = snapshot(model)
    for layout, name in (("timm", "model.safetensors"), ("reference", "model.safetensors"), ("timm", "new.pth")):
        result = run_as_user([*CLI, "export", "--to", layout, "--model_name_or_path", str(model), "--output",
                              str(model / name)], tmp_path)
        assert_one_line(result, "inside the model folder")
    assert snapshot(model) == before
    users = user_files(tmp_path / "elsewhere")
    kept = snapshot(users)
    result = run_as_user([*CLI, "export", "--to", "reference", "--model_name_or_path", str(model), "--output",
                          str(users / "notes.md")], tmp_path)
    assert_one_line(result, "notes.md", "not written by convnextv2-hf")
    for _ in range(2):  # a second export replaces the first: that file is ours
        result = run_as_user([*CLI, "export", "--to", "reference", "--model_name_or_path", str(model), "--output",
                              str(users / "ref.pth")], tmp_path)
        assert result.returncode == 0, result.stderr[-2000:]
    assert {k: v for k, v in snapshot(users).items() if k in kept} == kept


def test_demo_never_deletes_folders_it_did_not_write(tmp_path):
    project = user_files(tmp_path / "proj")
    make_image_folder(project / "data", per_class=2, corrupt=False)
    (project / "runs").mkdir()
    (project / "runs" / "log.txt").write_text("my run log")
    before = snapshot(project)
    result = run_as_user([*CLI, "demo", "--output_dir", str(project), "--quick"], tmp_path)
    assert_one_line(result, "data", "not written by convnextv2-hf")
    result = run_as_user([*CLI, "demo", "--output_dir", str(project), "--quick", "--train_dir",
                          str(project / "data"), "--overwrite_output_dir"], tmp_path)
    assert result.returncode == 2, result.stderr[-2000:]
    assert snapshot(project) == before


def test_demo_refuses_images_inside_its_own_outputs(tmp_path):
    from convnextv2_hf.outputs.manifest import record

    project = tmp_path / "proj"
    make_image_folder(project / "data" / "train", per_class=2, corrupt=False)
    record(project, "data")  # as an earlier demo run would have
    before = snapshot(project)
    result = run_as_user([*CLI, "demo", "--output_dir", str(project), "--quick", "--train_dir",
                          str(project / "data" / "train")], tmp_path)
    assert_one_line(result, "--train_dir", "inside the demo's own output")
    assert snapshot(project) == before


def pretrain_args(images, out, *extra):
    return ["--train_dir", str(images), "--output_dir", str(out), "--config_overrides", TINY_OVERRIDES,
            "--image_size", "32", "--per_device_train_batch_size", "4", "--num_warmup_steps", "1",
            "--sparse_grn_scope", "sample", "--checkpointing_steps", "1", "--checkpoints_total_limit", "2", *extra]


def finetune_args(images, out, *extra):
    return ["--train_dir", str(images), "--output_dir", str(out), "--config_overrides", TINY_OVERRIDES,
            "--image_size", "32", "--per_device_train_batch_size", "4", "--learning_rate", "1e-3",
            "--save_strategy", "steps", "--save_steps", "1", "--save_total_limit", "2", "--eval_strategy", "no",
            "--report_to", "none", "--train_val_split", "0.25", "--disable_tqdm", "true", *extra]


def run_ok(command, tmp_path):
    result = run_as_user(command, tmp_path, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_overwrite_output_dir_starts_over_without_the_earlier_runs_checkpoints(tmp_path):
    images = make_image_folder(tmp_path / "images", per_class=6, corrupt=False)
    for script, args, steps in ((PRETRAIN, pretrain_args, ("--max_train_steps",)),
                                (FINETUNE, finetune_args, ("--max_steps",))):
        out = user_files(tmp_path / f"out-{Path(script[1]).stem}")
        mine = snapshot(out)
        run_ok([*script, *args(images, out, steps[0], "6")], tmp_path)
        assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-5", "checkpoint-6"]
        run_ok([*script, *args(images, out, steps[0], "3", "--overwrite_output_dir")], tmp_path)
        assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-3"]
        assert {k: v for k, v in snapshot(out).items() if k in mine} == mine
        run_ok([*script, *args(images, out, steps[0], "4", "--resume_from_checkpoint", "latest")], tmp_path)
        assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-3", "checkpoint-4"]


def test_users_folders_named_like_our_staging_folders_are_never_touched(tmp_path):
    """A staging name is ours only if this run created it: a user's `.tmp-save`, `.tmp-checkpoint-1`,
    `.tmp-old-checkpoint-2` or `.tmp-<export>` is left byte-identical, and the run still succeeds."""
    images = make_image_folder(tmp_path / "images", per_class=4, corrupt=False)
    out = tmp_path / "out"
    for name in (".tmp-save", ".tmp-checkpoint-1", ".tmp-old-checkpoint-2", ".tmp-checkpoint-2"):
        (out / name).mkdir(parents=True)
        (out / name / "notes.txt").write_text(f"mine: {name}\n")
    mine = snapshot(out)
    run_ok([*PRETRAIN, *pretrain_args(images, out, "--max_train_steps", "3")], tmp_path)
    assert {k: v for k, v in snapshot(out).items() if k in mine} == mine
    assert (out / "model.safetensors").is_file() and (out / "checkpoint-3").is_dir()
    again = run_as_user([*PRETRAIN, *pretrain_args(images, out, "--max_train_steps", "4", "--resume_from_checkpoint",
                                                    "latest")], tmp_path, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert {k: v for k, v in snapshot(out).items() if k in mine} == mine

    export_dir = tmp_path / "exports"
    export_dir.mkdir()
    (export_dir / ".tmp-atto.safetensors").write_bytes(b"a user's file")
    kept = snapshot(export_dir)
    result = run_as_user([*CLI, "export", "--to", "timm", "--model_name_or_path", str(out), "--output",
                          str(export_dir / "atto.safetensors")], tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert {k: v for k, v in snapshot(export_dir).items() if k in kept} == kept
    assert (export_dir / "atto.safetensors").is_file()
    assert sorted(p.name for p in export_dir.iterdir() if p.name.startswith(".tmp")) == [".tmp-atto.safetensors"]


def test_a_named_pipe_with_an_image_name_is_skipped_not_opened(tmp_path):
    """`mkfifo data/ants/zz.jpg` used to block the run forever: non-regular files are counted as ignored."""
    images = make_image_folder(tmp_path / "images", per_class=4, corrupt=False)
    os.mkfifo(images / "cats" / "zz.jpg")
    os.symlink(images / "cats" / "zz.jpg", images / "dogs" / "link-to-pipe.jpg")
    result = run_as_user([*PRETRAIN, *pretrain_args(images, tmp_path / "out", "--max_train_steps", "1")], tmp_path,
                         timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "ignoring 2 non-image file(s)" in result.stderr


def in_mount_namespace(mount: str, command: list[str], before: str = "") -> list[str]:
    """`command` in its own mount namespace after the shell command `mount` (then `before`, in the background);
    skipped where this machine gives no unshare or mount rights (root)."""
    import shutil
    import subprocess

    if not shutil.which("unshare") or subprocess.run(["unshare", "-m", "sh", "-c", mount], capture_output=True).returncode:
        pytest.skip("a private mount needs unshare and mount rights (root), which this machine does not give")
    return ["unshare", "-m", "sh", "-c", f'{mount} && {before}exec "$@"', "sh", *command]


def with_small_shared_memory(command: list[str], size: str = "1m", fill_once: Path | None = None) -> list[str]:
    """`command` in its own mount namespace whose /dev/shm is a tmpfs of `size` (1 MB, as in many containers); with
    `fill_once`, /dev/shm is kept full from the moment that path exists (within 60 s), as another program might."""
    # filled again every 10 ms for about 20 s: room that the run's own batches free up is taken too
    fill = (f'(for i in $(seq 1200); do [ -e "{fill_once}" ] && break; sleep 0.05; done; for j in $(seq 2000); do '
            'cat /dev/zero >> /dev/shm/filler; sleep 0.01; done) >/dev/null 2>&1 & ') if fill_once else ""
    return in_mount_namespace(f"mount -t tmpfs -o size={size} tmpfs /dev/shm", command, fill)


def test_a_small_dev_shm_is_refused_in_one_line_before_the_workers_start(tmp_path):
    """With a 1 MB /dev/shm, two data-loader workers used to hang (folders) or lose batches (shards): both scripts
    now stop at once with one line naming /dev/shm and the fixes; without workers the same run trains."""
    images = make_image_folder(tmp_path / "images", per_class=4, corrupt=False)
    big = ["--image_size", "224", "--per_device_train_batch_size", "8", "--dataloader_num_workers", "2"]
    for script, args, steps in ((PRETRAIN, pretrain_args, "--max_train_steps"), (FINETUNE, finetune_args, "--max_steps")):
        out = tmp_path / f"out-{Path(script[1]).stem}"
        result = run_as_user(with_small_shared_memory([*script, *args(images, out, steps, "2", *big)]), tmp_path,
                             timeout=120)
        assert_one_line(result, "/dev/shm", "--dataloader_num_workers 0", "--shm-size")
    result = run_as_user(with_small_shared_memory([*PRETRAIN, *pretrain_args(
        images, tmp_path / "no-workers", "--max_train_steps", "2", "--dataloader_num_workers", "0")]), tmp_path,
        timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]


def test_dev_shm_filling_up_mid_run_ends_the_run_in_one_line(tmp_path):
    """/dev/shm runs out after the start-up check passed (another program filled it): a worker used to lose its
    batch in a background thread, and the run hung (a folder) or went on without it (shards). Now the run ends
    within seconds, with one line naming /dev/shm and the fixes, for both scripts' loaders."""
    from convnextv2_hf.training.data.shard_writer import write_shards

    images = make_image_folder(tmp_path / "images", per_class=8, corrupt=False)
    write_shards(str(images), str(tmp_path / "shards"), "webdataset", images_per_shard=4, num_proc=1)
    workers = ["--dataloader_num_workers", "2"]
    runs = ((PRETRAIN, pretrain_args(images, tmp_path / "pre", "--max_train_steps", "300", *workers)),
            (FINETUNE, finetune_args(tmp_path / "shards", tmp_path / "fine", "--max_steps", "300", "--validation_dir",
                                     str(images), *workers)))
    for script, args in runs:
        out = Path(args[args.index("--output_dir") + 1])
        result = run_as_user(with_small_shared_memory([*script, *args], "16m", fill_once=out / "checkpoint-2"),
                             tmp_path, timeout=120)
        steps = [int(p.name.split("-")[1]) for p in out.glob("checkpoint-*")]
        assert steps and max(steps) >= 2, result.stderr[-2000:]  # it trained before it failed
        assert_one_line(result, "ran out of shared memory", "--dataloader_num_workers 0", "--shm-size")


def with_read_only(folder: Path, command: list[str]) -> list[str]:
    """`command` in its own mount namespace where `folder` is mounted read-only (as a shared cache often is)."""
    return in_mount_namespace(f'mount -o bind,ro "{folder}" "{folder}"', command)


def test_a_read_only_datasets_cache_trains_where_it_can_and_names_the_fix_where_it_cannot(tmp_path):
    """A read-only datasets cache (a cluster's shared copy) used to end runs in a bare '[Errno 30]'. Fine-tuning
    from a folder and pre-training from shards train (the image-check record and datasets' lock files are not
    needed there, and the log says so); a dataset that must be cached is refused in one line naming the fix."""
    import shutil

    from convnextv2_hf.training.data.shard_writer import write_shards

    cache = tmp_path / "cache"
    cache.mkdir()
    images = make_image_folder(tmp_path / "images", per_class=4, corrupt=False)
    write_shards(str(images), str(tmp_path / "shards"), "webdataset", images_per_shard=4, num_proc=1)
    hub = tmp_path / "hub-copy" / "data"  # a local folder in the hub's layout stands in for a hub id
    hub.mkdir(parents=True)
    shutil.copy(next((tmp_path / "shards").glob("*.tar")), hub / "train-0.tar")
    shutil.copy(tmp_path / "shards" / "classes.json", hub)
    runs = {"folder": [*FINETUNE, *finetune_args(images, tmp_path / "fine", "--max_steps", "2")],
            "shards": [*PRETRAIN, *pretrain_args(tmp_path / "shards", tmp_path / "pre", "--max_train_steps", "2")],
            "hub": [*PRETRAIN, *pretrain_args(images, tmp_path / "hub", "--max_train_steps", "2")]}
    runs["hub"][runs["hub"].index("--train_dir"):runs["hub"].index("--train_dir") + 2] = [
        "--dataset_name", str(hub.parent)]
    results = {name: run_as_user(with_read_only(cache, command), tmp_path, timeout=180, HF_DATASETS_CACHE=str(cache))
               for name, command in runs.items()}
    assert "not writable" in assert_ok(results["shards"])
    assert "Could not record a passed image check" in assert_ok(results["folder"])
    assert_one_line(results["hub"], f"datasets cache {cache} is not writable", "--cache_dir", "HF_DATASETS_CACHE")
    assert not any(cache.iterdir())
