"""Work done once per machine in a multi-process launch: the first process of each machine lists an image folder,
the others read the index it wrote instead of listing the same million files again."""

from __future__ import annotations

import os
import shutil
import tempfile
from typing import Callable

from datasets import Dataset, DatasetDict


def once_per_machine(build: Callable[[], tuple[DatasetDict, int]]) -> tuple[DatasetDict, int]:
    """`build()` (returning splits and a count) run by each machine's first process; the other processes of the
    machine load its splits from a temporary Arrow file, removed once all have read it. An error `build` raises is
    raised by every process of that machine, as if each had run it. Every process of the launch must call this."""
    from accelerate import PartialState
    from accelerate.utils import gather_object

    state = PartialState()
    if state.num_processes == 1:
        return build()
    outcome, folder, failure = None, None, None
    if state.is_local_main_process:
        try:
            splits, count = build()
            folder = tempfile.mkdtemp(prefix="convnextv2-hf-index-")
            outcome = ("index", write_splits(splits, folder), count)
        except Exception as error:
            failure = error
            outcome = ("error", error if picklable(error) else ValueError(str(error)))
    # Ranks are numbered machine by machine: this machine's first process is the one `local_process_index` back.
    mine = gather_object([outcome])[state.process_index - state.local_process_index]
    try:
        if mine[0] == "error":
            raise failure if state.is_local_main_process else mine[1]
        return (splits, count) if state.is_local_main_process else (read_splits(mine[1]), mine[2])
    finally:
        state.wait_for_everyone()
        if folder:
            shutil.rmtree(folder, ignore_errors=True)


def picklable(error: Exception) -> bool:
    import pickle

    try:
        pickle.loads(pickle.dumps(error))
    except Exception:
        return False
    return True


def write_splits(splits: DatasetDict, folder: str) -> dict[str, str]:
    """Each split's table (features in its schema) as an Arrow stream file in `folder`; returns their paths."""
    import pyarrow as pa

    paths = {}
    for name, split in splits.items():
        paths[name] = os.path.join(folder, f"{name}.arrow")
        table = split.data.table
        with pa.OSFile(paths[name], "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(table)
    return paths


def read_splits(paths: dict[str, str]) -> DatasetDict:
    """The splits [`write_splits`] wrote, memory-mapped: the table's buffers stay in the file's pages, which every
    process of the machine shares through the page cache (a copy per process would be 1.2 GB at ImageNet-22k). The
    mapping outlives the file, which is removed once all processes have opened it; pickling (a spawned worker) copies
    the table, as for any in-memory one."""
    import pyarrow as pa
    from datasets.fingerprint import generate_random_fingerprint
    from datasets.table import InMemoryTable

    def mapped(path: str) -> pa.Table:
        with pa.memory_map(path) as source:
            return pa.ipc.open_stream(source).read_all()

    # A fingerprint given, not computed: datasets would hash the whole table.
    return DatasetDict({name: Dataset(InMemoryTable(mapped(path)), fingerprint=generate_random_fingerprint())
                        for name, path in paths.items()})
