"""Crash-safe checkpoints: written into a staging folder and renamed, so `checkpoint-N` exists only when complete.

Accelerate's own `save_state(total_limit=...)` names checkpoints by save count and deletes old ones before the new
one is written; here checkpoints are named by step (as the `Trainer` names them) and old ones are deleted only
after the new one is complete.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from contextlib import contextmanager
from pathlib import Path

from safetensors import SafetensorError

from .manifest import is_ours, record, remove_ours, replace_ours, written_names

PRETRAINING_MARKER = "training_state.json"  # written last into an FCMAE checkpoint
TRAINER_MARKER = "trainer_state.json"  # written last by the Trainer
STAGING_PREFIX = ".tmp-"
# Files a checkpoint must hold to resume exactly (the Trainer and Accelerate would silently start fresh without them).
RESUME_STATE = {TRAINER_MARKER: ("optimizer.pt", "scheduler.pt"), PRETRAINING_MARKER: ("optimizer.bin", "scheduler.bin")}
_STEP = re.compile(r"^checkpoint-(\d+)$")


def staging_folder(parent: str | os.PathLike, name: str) -> Path:
    """`parent/.tmp-name`, recorded as ours (so a later run may clear it) and emptied; not yet created."""
    staged = Path(parent, f"{STAGING_PREFIX}{name}")
    record(parent, staged.name)
    shutil.rmtree(staged, ignore_errors=True)
    return staged


def publish(staged: str | os.PathLike, final: str | os.PathLike) -> Path:
    """Move a complete `staged` folder to `final` by renames only, replacing an older folder of that name only if
    convnextv2-hf wrote it."""
    staged, final = Path(staged), Path(final)
    retired = staging_folder(final.parent, f"old-{final.name}")
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
    staged = staging_folder(output_dir, "save")
    with failed_write_kept_out(staged, what, output_dir, marker):
        staged.mkdir(parents=True)
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
    missing = [name for name in RESUME_STATE[marker] if not (found / name).is_file()]
    if missing:
        raise FileNotFoundError(f"--resume_from_checkpoint: {found} lacks {', '.join(missing)}, so the optimizer or "
                                "learning-rate schedule would restart from scratch; restore the file or resume from "
                                "another checkpoint.")
    return str(found)


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
