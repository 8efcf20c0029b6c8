"""Data-loader workers hand their batches over through shared memory (`/dev/shm` on Linux). Containers often give
it 64 MB or less; a worker that cannot allocate there fails in a background thread (torch's queue feeder), and the
loader then waits forever for its batch or goes on without it. So the room is checked before the workers start, and
each batch is moved there by the worker itself (`InSharedMemory`), where a failure reaches the training loop."""

from __future__ import annotations

import os
import shutil

import torch
from torch.utils.data import get_worker_info

SHARED_MEMORY = "/dev/shm"
DEFAULT_PREFETCH = 2  # torch's DataLoader: batches each worker prepares ahead


def batch_bytes(batch_size: int, image_size: int, bytes_per_value: int) -> int:
    """The pixels of one batch of 3-channel square images."""
    return batch_size * 3 * image_size * image_size * bytes_per_value


def check_shared_memory(workers: int, one_batch: int, prefetch: int | None = None, folder: str = SHARED_MEMORY) -> None:
    """Refuse, in one line naming the cause and both fixes, a loader whose workers' batches in flight (each worker
    prepares `prefetch` ahead) would not fit in the free shared memory; nothing to check without workers or where
    there is no `/dev/shm`."""
    if workers <= 0 or not os.path.isdir(folder):
        return
    needed = workers * (prefetch or DEFAULT_PREFETCH) * one_batch * 5 // 4  # a quarter more: the collated copies
    free = shutil.disk_usage(folder).free
    if free < needed:
        raise ValueError(f"{folder} has {free / 2**20:,.1f} MiB free, but {workers} data-loader worker(s) need about "
                         f"{needed / 2**20:,.1f} MiB of it to hand batches over; {FIXES}.")


FIXES = ("pass --dataloader_num_workers 0 (or fewer workers, or a smaller batch), or give the machine more shared "
         "memory (docker run --shm-size 8g)")


class InSharedMemory:
    """Wraps a collator: in a data-loader worker, its batch's tensors are moved to shared memory before the batch is
    handed over (the copy the hand-over would make anyway), so running out of room there fails the batch, and the
    loader raises that in the training process, instead of losing the batch in the queue's background thread."""

    def __init__(self, collator):
        self.collator = collator

    def __call__(self, examples):
        batch = self.collator(examples)
        if get_worker_info() is not None:
            try:
                for value in (batch.values() if isinstance(batch, dict) else batch):
                    if isinstance(value, torch.Tensor):
                        value.share_memory_()
            except RuntimeError as error:
                if "shared memory" not in str(error):
                    raise
                raise RuntimeError(out_of_shared_memory()) from None
        return batch


def out_of_shared_memory() -> str:
    """The one line for a batch that found no room in shared memory, with the room left and the fixes."""
    free = shutil.disk_usage(SHARED_MEMORY).free if os.path.isdir(SHARED_MEMORY) else 0
    return (f"a data-loader worker ran out of shared memory for its batch ({SHARED_MEMORY} has {free / 2**20:,.1f} "
            f"MiB free); {FIXES}")


def explain_shared_memory_error(message: str) -> str:
    """torch's own words when a worker's tensors find no room elsewhere than in `InSharedMemory` (while collating,
    or in the queue), replaced by the line that names the fixes; any other message unchanged."""
    return out_of_shared_memory() if "unable to allocate shared memory" in message else message
