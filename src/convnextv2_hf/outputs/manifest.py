"""What this project wrote into a folder, so that it deletes or replaces only its own files.

Every command that writes into a folder a user named (`--output_dir`, an export target, the demo's folder) records
the top-level names it writes in `.convnextv2-hf-written.json` there *before* writing them. Removing, replacing and
rotating go through [`remove_ours`] / [`replace_ours`], which refuse a name the manifest does not list: a user's
notes, photos or checkpoint beside our outputs are never touched.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

MANIFEST_NAME = ".convnextv2-hf-written.json"


class NotOursError(ValueError):
    """A path this command would delete or replace was not written by convnextv2-hf."""


def written_names(folder: str | os.PathLike) -> set[str]:
    """Top-level names in `folder` that convnextv2-hf wrote (empty when it never wrote there)."""
    try:
        return set(json.loads(Path(folder, MANIFEST_NAME).read_text()).get("written", []))
    except (OSError, ValueError, AttributeError):
        return set()


def _save(folder: Path, names: set[str]) -> None:
    staged = folder / f"{MANIFEST_NAME}.{os.getpid()}"
    staged.write_text(json.dumps({"written": sorted(names)}, indent=1))
    os.replace(staged, folder / MANIFEST_NAME)


def record(folder: str | os.PathLike, *names: str) -> None:
    """Add `names` (entries of `folder`) to its manifest; call before writing them."""
    folder = Path(folder)
    known = written_names(folder)
    if not set(names) <= known:
        folder.mkdir(parents=True, exist_ok=True)
        _save(folder, known | set(names))


def forget(folder: str | os.PathLike, *names: str) -> None:
    folder = Path(folder)
    known = written_names(folder)
    if known & set(names):
        _save(folder, known - set(names))


def is_ours(path: str | os.PathLike) -> bool:
    path = Path(path)
    return path.name in written_names(path.parent)


def refuse_unless_ours(path: str | os.PathLike, action: str = "replace") -> None:
    """Raise [`NotOursError`] when `path` exists but convnextv2-hf did not write it."""
    path = Path(path)
    if (path.exists() or path.is_symlink()) and not is_ours(path):
        raise NotOursError(f"{str(path)!r} was not written by convnextv2-hf and this command would {action} it; move "
                           "it elsewhere or choose another output folder.")


def remove_ours(path: str | os.PathLike) -> None:
    """Delete `path` (file or folder) if convnextv2-hf wrote it; refuse if it did not."""
    path = Path(path)
    refuse_unless_ours(path, "delete")
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink()
    forget(path.parent, path.name)


def replace_ours(source: str | os.PathLike, target: str | os.PathLike) -> None:
    """Move `source` to `target` by a rename; an existing `target` must be ours (a folder is removed first)."""
    target = Path(target)
    refuse_unless_ours(target)
    record(target.parent, target.name)
    if target.is_dir() and not target.is_symlink():
        shutil.rmtree(target)
    os.replace(source, target)


def unrecorded(folder: str | os.PathLike, names) -> list[str]:
    """Those of `names` (file names or glob patterns) that exist in `folder` without being ours."""
    folder, known = Path(folder), written_names(folder)
    found = set()
    for pattern in names:
        found.update(p.name for p in folder.glob(pattern) if p.name not in known)
    return sorted(found)
