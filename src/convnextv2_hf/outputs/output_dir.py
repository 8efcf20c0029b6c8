"""An output folder belongs to one run: checked before any work (writable, free space, no other run's results
unless resuming or overwriting) and locked while the run lasts (a lock left by a dead process is taken over)."""

from __future__ import annotations

import atexit
import json
import os
import shutil
import socket
from pathlib import Path

from .staging import remove_staging_leftovers
from .manifest import is_ours, remove_ours, unrecorded

LOCK_NAME = ".convnextv2-hf.lock"
RUN_FILES = ("model.safetensors", "pytorch_model.bin", "config.json", "train_results.json", "all_results.json",
             "results.json")  # the last one: a demo's report
# Every top-level name a training run or a conversion writes into its output folder: one of these that exists
# without being ours is refused before any work, since the run would have to replace it at the end.
RUN_OUTPUTS = RUN_FILES + ("checkpoint-*", "preprocessor_config.json", "configuration_convnextv2.py",
                           "modeling_convnextv2.py", "image_processing_convnextv2.py", "sparse_backends.py",
                           "sparse_ops.py", "masking.py", "README.md", "ema",
                           "log_history.json", "loss_curve.png", "reconstructions.png", "train_loss.png",
                           "eval_accuracy.png")


class OutputDirError(ValueError):
    """The output folder cannot be used as asked; the message says why and what to do."""


def holds_a_run(folder: Path) -> bool:
    return any((folder / name).exists() for name in RUN_FILES) or any(folder.glob("checkpoint-*"))


def check_output_dir(path: str | os.PathLike, flag: str, resume: bool = False, overwrite: bool = False,
                     needed_bytes: int = 0, writes: tuple[str, ...] = RUN_OUTPUTS, resumable: bool = True) -> Path:
    """Create `path` if needed and check it can take this run; raise [`OutputDirError`] naming the fix if not
    (`resumable`: whether the command takes `--resume_from_checkpoint`, to name it as a fix)."""
    folder = Path(path)
    if folder.exists() and not folder.is_dir():
        raise OutputDirError(f"{flag} {str(path)!r} is a file, not a folder; choose a folder path.")
    if folder.is_dir() and holds_a_run(folder) and not resume and not overwrite:
        resuming = "--resume_from_checkpoint latest to continue it, " if resumable else ""
        raise OutputDirError(f"{flag} {str(path)!r} already holds a model or checkpoints from another run; pass "
                             f"{resuming}--overwrite_output_dir to replace it, or choose another folder.")
    if folder.is_dir() and (foreign := unrecorded(folder, writes)):
        raise OutputDirError(f"{flag} {str(path)!r} holds {', '.join(foreign[:4])} not written by convnextv2-hf, "
                             "which this run would have to replace (--overwrite_output_dir replaces only our own "
                             "outputs); move them elsewhere or choose another folder.")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-probe-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as error:
        raise OutputDirError(f"Cannot write to {flag} {str(path)!r} ({error.strerror or error}); choose a writable "
                             "folder.") from None
    free = shutil.disk_usage(folder).free
    if needed_bytes and free < needed_bytes:
        raise OutputDirError(f"{flag} {str(path)!r} has {free / 2**20:.0f} MiB free but one checkpoint needs about "
                             f"{needed_bytes / 2**20:.0f} MiB; free some space or choose another disk.")
    return folder


def remove_earlier_run(folder: str | os.PathLike, writes: tuple[str, ...] = RUN_OUTPUTS) -> list[str]:
    """`--overwrite_output_dir`: delete the earlier run's checkpoints and results, ours only; returns their names."""
    removed = []
    for pattern in writes:
        for path in sorted(Path(folder).glob(pattern)):
            if is_ours(path):
                remove_ours(path)
                removed.append(path.name)
    return removed


def claim_output_dir(path: str | os.PathLike, resume: bool, overwrite: bool) -> "OutputDirLock":
    """Check `--output_dir` can take this run, lock it (the lock is returned, held), clear what a killed run left
    half-written there and, with `overwrite` (and no resume), the earlier run's outputs. Main process only."""
    check_output_dir(path, "--output_dir", resume=resume, overwrite=overwrite)
    lock = OutputDirLock(path).__enter__()
    remove_staging_leftovers(path)
    if overwrite and not resume:
        remove_earlier_run(path)
    return lock


def checkpoint_bytes(num_parameters: int, with_optimizer: bool = True) -> int:
    """About what one checkpoint takes: fp32 weights, plus two Adam moments, plus 10 % for the rest."""
    return int(num_parameters * 4 * (3 if with_optimizer else 1) * 1.1)


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class OutputDirLock:
    """A lock file naming the process that owns the folder, as a context manager (also released at exit). A lock
    left by a dead process on this host, or by this process's own earlier run, is taken over; a live one is an error.
    """

    def __init__(self, folder: str | os.PathLike, flag: str = "--output_dir"):
        self.path, self.flag = Path(folder) / LOCK_NAME, flag

    def __enter__(self) -> "OutputDirLock":
        owner = {"pid": os.getpid(), "host": socket.gethostname()}
        for _ in range(2):
            try:
                handle = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                self._take_over_if_stale()
                continue
            with os.fdopen(handle, "w") as out:
                json.dump(owner, out)
            atexit.register(self.release)
            return self
        raise OutputDirError(f"Could not lock {self.flag} {str(self.path.parent)!r}.")

    def __exit__(self, *exc) -> None:
        self.release()

    def _take_over_if_stale(self) -> None:
        try:
            owner = json.loads(self.path.read_text() or "{}")
        except (OSError, ValueError):
            owner = {}
        same_host, pid = owner.get("host") == socket.gethostname(), owner.get("pid")
        if same_host and pid and pid != os.getpid() and process_alive(int(pid)):
            raise OutputDirError(f"{self.flag} {str(self.path.parent)!r} is in use by another run (process {pid}); "
                                 "wait for it to finish or choose another folder.")
        if owner and not same_host:
            raise OutputDirError(f"{self.flag} {str(self.path.parent)!r} is locked by a run on {owner.get('host')}; if "
                                 f"that run is gone, delete {self.path}.")
        self.path.unlink(missing_ok=True)

    def release(self) -> None:
        try:
            if json.loads(self.path.read_text()).get("pid") == os.getpid():
                self.path.unlink()
        except (OSError, ValueError):
            pass
