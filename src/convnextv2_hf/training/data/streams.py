"""A streamed training set shared out between processes and data-loader workers, resumable at the exact row.

Each process's data-loader workers read disjoint parts of the stream: whole shards when there are at least as many
shards as parts (processes x workers), otherwise every n-th row. A part reads its shards one after the other in an
order drawn from (seed, epoch), each through a buffer of `SHUFFLE_BUFFER` rows drawn from (seed, epoch, shard). A
row's place in its part seeds its augmentation and travels with the sample (`stream_position`: part, epoch,
place), so the training side knows the last row it used from each part.

A resumed part skips the shards it had finished without opening them (where their sizes are known: write-shards
records them) and the rows it had used of the next one without decoding them. A `DataLoader` takes batches from
its workers in turn, starting with worker 0 whenever it starts; a resumed run therefore lets worker 0 play the part
whose batch came next when the checkpoint was taken (`first_part`), worker 1 the one after, and so on: the batches
come in the uninterrupted run's order.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import IterableDataset as TorchIterableDataset, get_worker_info

from .transforms import sample_generator

SHUFFLE_BUFFER = 1000  # rows; shards are shuffled when written, and their order per epoch


def part_rows(dataset, seed: int, epoch: int, part: int, parts: int, shard_sizes=None, start: int = 0):
    """(place, row) of `part` of `parts` of a `datasets` stream, from place `start` on, in an order drawn from
    (seed, epoch); shards of known size that end before `start` are not opened."""
    shards = dataset.num_shards
    if parts > shards:  # fewer shards than parts: every part reads all and keeps every n-th row
        everyone = shard_rows(dataset, seed, epoch, np.random.default_rng([seed, epoch]).permutation(shards).tolist())
        mine = (row for index, row in enumerate(everyone) if index % parts == part)
        yield from ((place, row) for place, row in enumerate(mine) if place >= start)
        return
    mine = list(range(part, shards, parts))
    order = [mine[i] for i in np.random.default_rng([seed, epoch, part]).permutation(len(mine))]
    place = 0
    for shard in order:
        size = shard_sizes[shard] if shard_sizes is not None else None
        if size is not None and place + size <= start:
            place += size  # used before the checkpoint: not even opened
            continue
        read = 0
        for row in shard_rows(dataset, seed, epoch, [shard]):
            if place >= start:
                yield place, row
            place, read = place + 1, read + 1
        if size is not None and read != size:
            raise ValueError(f"Shard {shard} of the stream holds {read} images where its record (shards.json) says "
                             f"{size}; write the shards again, or remove the stale shards.json.")


def shard_rows(dataset, seed: int, epoch: int, shards):
    """The rows of `shards` of a `datasets` stream, one shard after the other, each through its own shuffle buffer."""
    for shard in shards:
        rng = np.random.default_rng([seed, epoch, shard, 1])
        buffer = []
        for row in rows_of(dataset.shard(num_shards=dataset.num_shards, index=shard, contiguous=True)):
            if len(buffer) < SHUFFLE_BUFFER:
                buffer.append(row)
                continue
            pick = int(rng.integers(SHUFFLE_BUFFER))
            buffer[pick], row = row, buffer[pick]
            yield row
        yield from (buffer[i] for i in rng.permutation(len(buffer)))


def rows_of(stream):
    """Rows of a `datasets` stream read in this process as they are (`datasets` would split them again between
    data-loader workers when iterated inside one)."""
    for batch in stream.iter(batch_size=1):
        yield {key: values[0] for key, values in batch.items()}


class ResumableStream(TorchIterableDataset):
    """Base of the streamed training sets: parts, places, resume. `endless` streams go on to the next epoch of their
    part by themselves (one `Trainer` epoch of `max_steps`); others end with their part (the caller sets the epoch)."""

    endless = False

    def __init__(self, dataset, seed: int, rank: int = 0, world: int = 1, shard_sizes: list | None = None):
        self.dataset, self.seed, self.rank, self.world, self.epoch = dataset, seed, rank, world, 0
        self.shard_sizes = shard_sizes  # images per shard (None: unknown), to skip finished shards unread
        if shard_sizes and None not in shard_sizes and sum(shard_sizes) < world:
            raise ValueError(f"The shards hold {sum(shard_sizes)} image(s) for {world} processes, which need at least "
                             "one each; launch fewer processes, or give more images.")
        self.resume_after: dict[int, tuple[int, int]] = {}  # part -> (epoch, last place used before the checkpoint)
        self.first_part = 0  # the part the loader's worker 0 plays (the part whose batch came next)
        self.used: dict[int, tuple[int, int]] = {}  # training side: part -> (epoch, last place used)
        self.last_part: int | None = None

    def sample(self, row: dict, generator: torch.Generator, index: int, epoch: int) -> dict | None:
        """The training sample of `row` (None: skip it)."""
        raise NotImplementedError

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.resume_after, self.first_part = {}, 0
        self.epoch, self.used, self.last_part = epoch, dict(self.resume_after), None

    def record(self, positions: torch.Tensor) -> None:
        """Note the (part, epoch, place) rows of a batch the training loop took (a CPU tensor)."""
        for part, epoch, place in positions.tolist():
            self.used[part] = max(self.used.get(part, (-1, -1)), (epoch, place))
            self.last_part = part

    def progress(self, workers: int) -> list[int]:
        """[part of the next batch, then epoch and last place used for each part] for a checkpoint."""
        parts = max(1, workers)
        following = self.first_part if self.last_part is None else (self.last_part + 1) % parts
        return [following] + [value for part in range(parts) for value in self.used.get(part, (self.epoch, -1))]

    def resume_at(self, progress: list[int], workers: int) -> None:
        parts = max(1, workers)
        if len(progress) == parts + 1:  # [epoch, last place per worker]: places in the stream order before 0.4.0
            raise ValueError("This streamed checkpoint was written by convnextv2-hf 0.3.0 or earlier, whose stream "
                             "order 0.4.0 no longer follows; resume it with that release, or start a new --output_dir.")
        if len(progress) != 2 * parts + 1:
            saved = (len(progress) - 1) // 2
            raise ValueError(f"This streamed run was checkpointed with {saved} data-loader worker(s) per process; "
                             f"resume it with --dataloader_num_workers {saved} (now {workers}).")
        self.first_part = progress[0]
        self.resume_after = {part: (progress[1 + 2 * part], progress[2 + 2 * part]) for part in range(parts)}
        self.epoch = min(epoch for epoch, _ in self.resume_after.values())
        self.used, self.last_part = dict(self.resume_after), None

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        part = (worker + self.first_part) % workers
        epoch, start = self.resume_after.get(part, (self.epoch, -1))
        start += 1
        while True:
            produced = False
            for place, row in part_rows(self.dataset, self.seed, epoch, part * self.world + self.rank,
                                        workers * self.world, self.shard_sizes, start):
                index = (place * workers + part) * self.world + self.rank  # unique over processes and parts
                sample = self.sample(row, sample_generator(self.seed, epoch, index), index, epoch)
                if sample is not None:
                    produced = True
                    yield sample | {"stream_position": torch.tensor([part, epoch, place])}
            if not self.endless or not (produced or start > 0):
                return
            epoch, start = epoch + 1, 0


class KeepsStreamPositions:
    """A collator that also stacks the samples' `stream_position`, where they have one, into the batch."""

    def __init__(self, collator):
        self.collator = collator

    def __call__(self, examples: list[dict]) -> dict:
        batch = self.collator(examples)
        if "stream_position" in examples[0]:
            batch["stream_position"] = torch.stack([example["stream_position"] for example in examples])
        return batch
