"""The `datasets` cache as training uses it. Clusters often mount a shared, read-only copy of it: a stream only needs
somewhere to put `datasets`' lock files, and our image-check records are a shortcut, so neither stops a run there;
a hub dataset that must be downloaded does, in one line naming the folder and the fix."""

from __future__ import annotations

import errno
import logging
import os
import tempfile

logger = logging.getLogger(__name__)

READ_ONLY = (errno.EROFS, errno.EACCES, errno.EPERM)
FIX = "set HF_DATASETS_CACHE to a writable folder"


def datasets_cache(cache_dir: str | None = None) -> str:
    """The folder `datasets` would cache in: `cache_dir`, else HF_DATASETS_CACHE's."""
    from datasets import config

    return os.path.expanduser(str(cache_dir or config.HF_DATASETS_CACHE))


def is_writable(folder: str) -> bool:
    try:
        os.makedirs(folder, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            return True
    except OSError:
        return False


def stream_cache_dir(cache_dir: str | None = None) -> str | None:
    """`cache_dir` for a streamed `load_dataset`: as given when its folder is writable; else a temporary folder
    (streams keep nothing there but lock files), said once in the log."""
    folder = datasets_cache(cache_dir)
    if is_writable(folder):
        return cache_dir
    fallback = os.path.join(tempfile.gettempdir(), "convnextv2-hf-datasets-cache")
    logger.warning("The datasets cache %s is not writable; streaming with %s for datasets' lock files instead (%s "
                   "to choose the folder).", folder, fallback, FIX)
    return fallback


def record_in_cache(path: str) -> None:
    """Create the empty record file `path` inside the datasets cache; a read-only cache is said once in the log,
    and the record is then not kept (what it saves is done again next time)."""
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        open(path, "a").close()
    except OSError as error:
        if error.errno not in READ_ONLY:
            raise
        logger.warning("Could not record a passed image check in %s (%s); it will run again next time (%s to keep "
                       "it).", os.path.dirname(path), error.strerror, FIX)


def refuse_read_only(error: BaseException, cache_dir: str | None = None) -> None:
    """Raise `error` again as one line naming the cache and the fix when it is a read-only or forbidden cache."""
    if isinstance(error, OSError) and error.errno in READ_ONLY:
        raise ValueError(f"The datasets cache {datasets_cache(cache_dir)} is not writable ({error.strerror}: "
                         f"{error.filename}); pass a writable --cache_dir, or {FIX}.") from None
