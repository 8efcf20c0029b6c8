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

PRETRAINING_MARKER = "training_state.json"  # written last into an FCMAE checkpoint
TRAINER_MARKER = "trainer_state.json"  # written last by the Trainer
STAGING_PREFIX = ".tmp-"
_STEP = re.compile(r"^checkpoint-(\d+)$")


def publish(staged: str | os.PathLike, final: str | os.PathLike) -> Path:
    """Move a complete `staged` folder to `final` (replacing an older folder of that name) by renames only."""
    staged, final = Path(staged), Path(final)
    retired = final.with_name(f"{STAGING_PREFIX}old-{final.name}")
    if final.exists():
        if retired.exists():
            shutil.rmtree(retired)
        os.replace(final, retired)
    os.replace(staged, final)
    shutil.rmtree(retired, ignore_errors=True)
    return final


class CheckpointWriteError(OSError):
    """A checkpoint or model could not be written (full disk, no permission); older checkpoints are intact."""


@contextmanager
def failed_write_kept_out(staged: str | os.PathLike, what: str, output_dir: str | os.PathLike, marker: str):
    """Turn a failed write (a full disk shows up as `OSError` or as torch's `RuntimeError` "unexpected pos") into
    one [`CheckpointWriteError`] that names the newest intact checkpoint; the half-written folder is removed."""
    try:
        yield
    except (OSError, RuntimeError) as error:
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
    staged = Path(output_dir, f"{STAGING_PREFIX}save")
    shutil.rmtree(staged, ignore_errors=True)
    with failed_write_kept_out(staged, what, output_dir, marker):
        staged.mkdir(parents=True)
        write(staged)
        for path in sorted(staged.iterdir()):
            target = Path(output_dir, path.name)
            if path.is_dir():
                shutil.rmtree(target, ignore_errors=True)
            os.replace(path, target)
    shutil.rmtree(staged, ignore_errors=True)


def save_model_and_processor(model, processor, folder: str | os.PathLike) -> None:
    model.save_pretrained(folder)
    processor.save_pretrained(folder)  # after the model: beside an FCMAE model it keeps its mask settings


def complete_checkpoints(output_dir: str | os.PathLike, marker: str) -> list[Path]:
    """`checkpoint-N` folders that hold `marker`, oldest step first."""
    found = []
    for path in Path(output_dir).glob("checkpoint-*"):
        match = _STEP.match(path.name)
        if match and path.is_dir() and (path / marker).is_file():
            found.append((int(match.group(1)), path))
    return [path for _, path in sorted(found)]


def find_checkpoint(output_dir: str | os.PathLike, requested: str, marker: str = PRETRAINING_MARKER) -> str:
    """`requested` itself, or for `"latest"` the newest complete checkpoint in `output_dir`."""
    if requested != "latest":
        if not Path(requested, marker).is_file():
            what = "is not a folder" if not os.path.isdir(requested) else f"holds no {marker} (incomplete checkpoint?)"
            raise FileNotFoundError(f"--resume_from_checkpoint {requested!r} {what}.")
        return str(requested)
    found = complete_checkpoints(output_dir, marker)
    if not found:
        raise FileNotFoundError(f"--resume_from_checkpoint latest: no complete checkpoint-* folder in {output_dir}.")
    return str(found[-1])


def checkpoint_step(path: str | os.PathLike) -> int:
    return int(_STEP.match(Path(path).name).group(1))


def rotate_checkpoints(output_dir: str | os.PathLike, keep: int | None, marker: str, protect: str | None = None) -> list[Path]:
    """Delete the oldest complete checkpoints beyond the newest `keep` (never `protect`); returns those deleted."""
    if not keep:
        return []
    found = complete_checkpoints(output_dir, marker)
    doomed = [p for p in found[:-keep] if protect is None or Path(protect).resolve() != p.resolve()]
    for path in doomed:
        shutil.rmtree(path)
    return doomed


def remove_staging_leftovers(output_dir: str | os.PathLike) -> int:
    """Delete half-written staging folders a killed run left behind; returns how many."""
    leftovers = [p for p in Path(output_dir).glob(f"{STAGING_PREFIX}*") if p.is_dir()]
    for path in leftovers:
        shutil.rmtree(path, ignore_errors=True)
    return len(leftovers)


def read_training_state(checkpoint: str | os.PathLike) -> dict:
    return json.loads(Path(checkpoint, PRETRAINING_MARKER).read_text())
