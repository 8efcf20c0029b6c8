"""Crash-safe checkpoints: written into a staging folder and renamed, so `checkpoint-N` exists only when complete.

Accelerate's own `save_state(total_limit=...)` names checkpoints by save count and deletes old ones before the new
one is written; here checkpoints are named by step (as the `Trainer` names them) and old ones are deleted only
after the new one is complete.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import re
import shutil
from contextlib import contextmanager
from pathlib import Path

from safetensors import SafetensorError, safe_open

from .manifest import is_ours, record, remove_ours, replace_ours, written_names

PRETRAINING_MARKER = "training_state.json"  # written last into an FCMAE checkpoint
TRAINER_MARKER = "trainer_state.json"  # written last by the Trainer
STAGING_PREFIX = ".tmp-"
# Files a checkpoint must hold to resume exactly (the Trainer and Accelerate would silently start fresh without them).
RESUME_STATE = {TRAINER_MARKER: ("optimizer.pt", "scheduler.pt"), PRETRAINING_MARKER: ("optimizer.bin", "scheduler.bin")}
_STEP = re.compile(r"^checkpoint-(\d+)$")


def claim_staging(parent: str | os.PathLike, name: str, folder: bool = True) -> Path:
    """Create `parent/.tmp-name` (a folder, or an empty file) exclusively and record it as ours. A path of that name
    that already exists is never touched, a user's or a killed run's alike: the next free `.tmp-name-K` is taken.
    A staging name is ours only because this call created it."""
    parent = Path(parent)
    parent.mkdir(parents=True, exist_ok=True)
    for attempt in itertools.count():
        path = parent / f"{STAGING_PREFIX}{name}{f'-{attempt}' if attempt else ''}"
        try:
            path.mkdir() if folder else path.open("xb").close()
        except FileExistsError:
            continue
        record(parent, path.name)
        return path


def shared_staging(accelerator, parent: str | os.PathLike, name: str, creator: bool) -> Path:
    """[`claim_staging`] by the `creator` process; every process of the launch gets the same path."""
    from accelerate.utils import broadcast_object_list

    claimed = [str(claim_staging(parent, name)) if creator else None]
    if accelerator.num_processes > 1:
        broadcast_object_list(claimed)
    return Path(claimed[0])


def publish(staged: str | os.PathLike, final: str | os.PathLike) -> Path:
    """Move a complete `staged` folder to `final` by renames only, replacing an older folder of that name only if
    convnextv2-hf wrote it."""
    staged, final = Path(staged), Path(final)
    retired = claim_staging(final.parent, f"old-{final.name}")
    if final.exists():
        replace_ours(final, retired)
    replace_ours(staged, final)
    remove_ours(retired)
    return final


class CheckpointWriteError(OSError):
    """A checkpoint or model could not be written (full disk, no permission); older checkpoints are intact."""


@contextmanager
def failed_write_kept_out(staged: str | os.PathLike, what: str, output_dir: str | os.PathLike, marker: str):
    """Turn a failed write (a full disk shows up as `OSError` or as torch's `RuntimeError` "unexpected pos") into
    one [`CheckpointWriteError`] that names the newest intact checkpoint; the half-written folder is removed."""
    try:
        yield
    except (OSError, RuntimeError, SafetensorError) as error:
        shutil.rmtree(staged, ignore_errors=True)
        kept = complete_checkpoints(output_dir, marker)
        reason = "the disk is full" if "No space left" in str(error) or "unexpected pos" in str(error) else str(error)
        raise CheckpointWriteError(
            f"Could not write {what} in {output_dir}: {reason}. "
            + (f"The newest complete checkpoint, {kept[-1]}, is intact." if kept else "No earlier checkpoint exists.")
        ) from error


def save_folder_atomically(output_dir: str | os.PathLike, write, what: str, marker: str) -> None:
    """`write(staging)` writes files (a model, its processor) into a staging folder; each is then moved into
    `output_dir` by a rename, so a failed or killed save leaves the earlier files whole."""
    staged = claim_staging(output_dir, "save")
    with failed_write_kept_out(staged, what, output_dir, marker):
        write(staged)
        for path in sorted(staged.iterdir()):
            replace_ours(path, Path(output_dir, path.name))
    remove_ours(staged)


def save_model_and_processor(model, processor, folder: str | os.PathLike) -> None:
    model.save_pretrained(folder)
    processor.save_pretrained(folder)  # after the model: beside an FCMAE model it keeps its mask settings


def complete_checkpoints(output_dir: str | os.PathLike, marker: str) -> list[Path]:
    """`checkpoint-N` folders this project wrote that hold `marker`, oldest step first."""
    found, ours = [], written_names(output_dir)
    for path in Path(output_dir).glob("checkpoint-*"):
        match = _STEP.match(path.name)
        if match and path.name in ours and path.is_dir() and (path / marker).is_file():
            found.append((int(match.group(1)), path))
    return [path for _, path in sorted(found)]


def find_checkpoint(output_dir: str | os.PathLike, requested: str, marker: str = PRETRAINING_MARKER) -> str:
    """`requested` itself, or for `"latest"` the newest complete checkpoint in `output_dir`; one that lacks the
    optimizer or scheduler state (which would silently restart) is refused."""
    if requested != "latest":
        if not Path(requested, marker).is_file():
            what = "is not a folder" if not os.path.isdir(requested) else f"holds no {marker} (incomplete checkpoint?)"
            raise FileNotFoundError(f"--resume_from_checkpoint {requested!r} {what}.")
        found = Path(requested)
    else:
        complete = complete_checkpoints(output_dir, marker)
        if not complete:
            raise FileNotFoundError(f"--resume_from_checkpoint latest: no complete checkpoint-* folder in {output_dir}.")
        found = complete[-1]
    missing = [name for name in RESUME_STATE[marker] if not holds_state(found, name)]
    if missing:
        raise FileNotFoundError(f"--resume_from_checkpoint: {found} lacks {', '.join(missing)}, so the optimizer or "
                                "learning-rate schedule would restart from scratch; restore the file or resume from "
                                "another checkpoint.")
    check_weight_files(found, "--resume_from_checkpoint", counters_allowed=True)
    return str(found)


def holds_state(checkpoint: Path, name: str) -> bool:
    """`name` (e.g. optimizer.bin) is in `checkpoint` as one file, or as Accelerate writes it under FSDP: a sharded
    `optimizer_0/` folder or one `optimizer_0_rank<i>.bin` per process."""
    stem, suffix = os.path.splitext(name)
    return ((checkpoint / name).is_file() or (checkpoint / f"{stem}_0").is_dir()
            or any(checkpoint.glob(f"{stem}_0_rank*{suffix}")))


def check_weight_files(folder: str | os.PathLike, flag: str, counters_allowed: bool = False) -> None:
    """Every `*.safetensors` file in `folder` must be readable and hold finite floating-point weights: a truncated
    copy, integer or NaN weights would otherwise load (cast or as they are) and train on silently. With
    `counters_allowed`, integer tensors (a checkpoint's step counters, e.g. the EMA's `n_averaged`) pass."""
    for file in sorted(Path(folder).glob("*.safetensors")):
        try:
            with safe_open(str(file), framework="pt") as handle:
                for key in handle.keys():
                    check_weight(handle.get_tensor(key), key, file, flag, counters_allowed)
        except SafetensorError as error:
            raise ValueError(f"{flag} {folder}: {file.name} cannot be read ({error}); it is truncated or damaged, so "
                             "copy it again or start from another checkpoint.") from None


def check_same_model(checkpoint: str | os.PathLike, model) -> None:
    """The checkpoint's weights (shapes read from the file header only) must fit `model`: resuming a run of another
    size would otherwise fail deep inside `load_state_dict`."""
    file = Path(checkpoint, "model.safetensors")
    if not file.is_file():
        return
    expected = {key: tuple(value.shape) for key, value in model.state_dict().items()}
    with safe_open(str(file), framework="pt") as handle:
        found = {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}
    differing = [key for key in found if key in expected and found[key] != expected[key]]
    if differing or not set(found) & set(expected):
        key = differing[0] if differing else next(iter(found), "(none)")
        raise ValueError(
            f"--resume_from_checkpoint {checkpoint} holds a different model than this run builds (e.g. {key}: "
            f"{found.get(key)} there, {expected.get(key)} here); resume with the arguments it was started with "
            "(--model_preset, --config_overrides, --model_name_or_path), or start a new --output_dir."
        )


def check_weight(tensor, key: str, file: Path, flag: str, counters_allowed: bool) -> None:
    if not tensor.is_floating_point() and counters_allowed:
        return
    if not tensor.is_floating_point():
        raise ValueError(f"{flag} {file.parent}: weight {key} in {file.name} is {tensor.dtype}, not floating point; "
                         "the file is damaged or not a model: start from another checkpoint.")
    if not bool(tensor.isfinite().all()):
        raise ValueError(f"{flag} {file.parent}: weight {key} in {file.name} holds NaN or infinite values; start "
                         "from another checkpoint (or resume from an earlier one).")


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN or infinite loss; no checkpoint or model from that step on was written."""


def check_finite_loss(loss, step: int, output_dir: str | os.PathLike, marker: str) -> None:
    """Stop at a NaN or infinite `loss` (a number, or a tensor gathered over processes) of `step` (counted from 1),
    before anything trained on it is saved."""
    if bool(loss.isfinite().all()) if hasattr(loss, "isfinite") else math.isfinite(loss):
        return
    value = float(loss.max()) if hasattr(loss, "max") else loss
    try:
        latest = find_checkpoint(output_dir, "latest", marker)
    except FileNotFoundError:
        latest = "none was written yet"
    raise NonFiniteLossError(
        f"The loss became {value} at step {step}; training stopped and nothing from that step on was saved (newest "
        f"checkpoint: {latest}). Check the images for NaN/Inf pixels, or lower the learning rate."
    )


def checkpoint_step(path: str | os.PathLike) -> int:
    return int(_STEP.match(Path(path).name).group(1))


def rotate_checkpoints(output_dir: str | os.PathLike, keep: int | None, marker: str, protect: str | None = None) -> list[Path]:
    """Delete the oldest complete checkpoints beyond the newest `keep` (never `protect`); returns those deleted."""
    if not keep:
        return []
    found = complete_checkpoints(output_dir, marker)
    doomed = [p for p in found[:-keep] if protect is None or Path(protect).resolve() != p.resolve()]
    for path in doomed:
        remove_ours(path)
    return doomed


def remove_staging_leftovers(output_dir: str | os.PathLike) -> int:
    """Delete the half-written staging folders a killed run of ours left behind; returns how many."""
    leftovers = [p for p in Path(output_dir).glob(f"{STAGING_PREFIX}*") if p.is_dir() and is_ours(p)]
    for path in leftovers:
        remove_ours(path)
    return len(leftovers)


def read_training_state(checkpoint: str | os.PathLike) -> dict:
    return json.loads(Path(checkpoint, PRETRAINING_MARKER).read_text())
