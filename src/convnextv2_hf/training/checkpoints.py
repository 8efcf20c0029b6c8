"""Checkpoints of a training run: found (`latest` or a path), rotated after the new one is complete, checked to
match the model, and a non-finite loss stopped before it is saved.

Accelerate's own `save_state(total_limit=...)` names checkpoints by save count and deletes old ones before the new
one is written; here checkpoints are named by step (as the `Trainer` names them) and old ones are deleted only
after the new one is complete (see `convnextv2_hf.outputs.staging`).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from safetensors import safe_open

from ..outputs.manifest import remove_ours
from ..outputs.staging import PRETRAINING_MARKER, TRAINER_MARKER, complete_checkpoints
from ..weights import check_weight_files

# Files a checkpoint must hold to resume exactly (the Trainer and Accelerate would silently start fresh without them).
RESUME_STATE = {TRAINER_MARKER: ("optimizer.pt", "scheduler.pt"), PRETRAINING_MARKER: ("optimizer.bin", "scheduler.bin")}


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


def rotate_checkpoints(output_dir: str | os.PathLike, keep: int | None, marker: str, protect: str | None = None) -> list[Path]:
    """Delete the oldest complete checkpoints beyond the newest `keep` (never `protect`); returns those deleted."""
    if not keep:
        return []
    found = complete_checkpoints(output_dir, marker)
    doomed = [p for p in found[:-keep] if protect is None or Path(protect).resolve() != p.resolve()]
    for path in doomed:
        remove_ours(path)
    return doomed


def read_training_state(checkpoint: str | os.PathLike) -> dict:
    return json.loads(Path(checkpoint, PRETRAINING_MARKER).read_text())
