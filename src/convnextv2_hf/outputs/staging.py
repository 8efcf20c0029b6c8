"""Folders and files written crash-safely: into a staging name this run created, then renamed, so a checkpoint,
a converted model or an export exists only when complete, and a staging name is never one a user made."""

from __future__ import annotations

import itertools
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


def remove_staging_leftovers(output_dir: str | os.PathLike) -> int:
    """Delete the half-written staging folders a killed run of ours left behind; returns how many."""
    leftovers = [p for p in Path(output_dir).glob(f"{STAGING_PREFIX}*") if p.is_dir() and is_ours(p)]
    for path in leftovers:
        remove_ours(path)
    return len(leftovers)
_STEP = re.compile(r"^checkpoint-(\d+)$")


def complete_checkpoints(output_dir: str | os.PathLike, marker: str) -> list[Path]:
    """`checkpoint-N` folders this project wrote that hold `marker`, oldest step first."""
    found, ours = [], written_names(output_dir)
    for path in Path(output_dir).glob("checkpoint-*"):
        match = _STEP.match(path.name)
        if match and path.name in ours and path.is_dir() and (path / marker).is_file():
            found.append((int(match.group(1)), path))
    return [path for _, path in sorted(found)]


def checkpoint_step(path: str | os.PathLike) -> int:
    return int(_STEP.match(Path(path).name).group(1))
