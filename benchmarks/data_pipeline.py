"""The `data` section of `benchmark.py`: what the input pipeline costs as the data set grows, against the reference's
own data path (torchvision `ImageFolder` + `DataLoader`, run in an environment with torchvision).

    python benchmarks/benchmark.py --sections data --output benchmarks/results-cpu-data.md

- Start-up: launch to the first optimizer step (one step of a tiny model; ours also save it) at two data sizes, for
  both scripts on a folder, pre-training on webdataset and parquet shards, and a 2-process launch; the per-image
  slope is fitted from the two sizes (on the time after the imports, `first_step.py`) and extrapolated to
  ImageNet-1k and -22k.
- Memory of the file index (RSS growth from listing the folder), ours against `ImageFolder`'s list of samples.
- Throughput of one data-loading worker, pre-training (decode, crop, flip) and fine-tuning (plus RandAugment and
  erasing) on 500x375 JPEGs and on 3000x2000 photos, ours against torchvision's transforms.
  `--data_tables throughput` runs this table alone.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
IMAGENET = {"ImageNet-1k": 1_281_167, "ImageNet-22k": 14_197_122}
TINY_MODEL = "depths=[1,1,1,1],hidden_sizes=[8,16,24,32],patch_size=2,decoder_hidden_size=16"
TORCHVISION_PYTHON = os.environ.get("CONVNEXTV2_TEST_TORCHVISION_PYTHON", "python")
ENV = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_VERBOSITY="error")

TORCHVISION_STARTUP = """
import sys, torch
from torchvision import datasets, transforms
folder = datasets.ImageFolder(sys.argv[1], transforms.Compose([transforms.RandomResizedCrop(32), transforms.ToTensor()]))
loader = torch.utils.data.DataLoader(folder, batch_size=64, shuffle=True, num_workers=int(sys.argv[2]))
model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 4, 4), torch.nn.Flatten(), torch.nn.LazyLinear(100))
images, labels = next(iter(loader))
optimizer = torch.optim.AdamW(model.parameters())
torch.nn.functional.cross_entropy(model(images), labels).backward()
optimizer.step()
"""

INDEX_RSS = """
import json, sys
def rss():
    return int(open("/proc/self/statm").read().split()[1]) * 4096 / 2**20
def anonymous():
    return next(int(line.split()[1]) / 1024 for line in open("/proc/self/status") if line.startswith("RssAnon:"))
kind, root = sys.argv[1], sys.argv[2]
if kind == "ours-mapped":  # another process of the machine: the first one's index file, memory-mapped
    import gc, tempfile
    from datasets import DatasetDict
    from convnextv2_hf.training.data.folders import folder_dataset, scan_folder
    from convnextv2_hf.training.data.per_machine import read_splits, write_splits
    files = write_splits(DatasetDict(train=folder_dataset(scan_folder(root, "--train_dir"), labelled=True)),
                         tempfile.mkdtemp())
    gc.collect()
    before, private = rss(), anonymous()
    index = read_splits(files)["train"]
    print(json.dumps({"mib": rss() - before, "private_mib": anonymous() - private, "images": len(index)}))
    sys.exit()
if kind == "ours":
    from convnextv2_hf.training.data.folders import folder_dataset, scan_folder
    folder_dataset(scan_folder(root + "/class000", "--train_dir"), labelled=False)  # the modules it imports lazily
    before = rss()
    index = folder_dataset(scan_folder(root, "--train_dir"), labelled=True)
else:
    from torchvision import datasets
    before = rss()
    index = datasets.ImageFolder(root)
print(json.dumps({"mib": rss() - before, "images": len(index)}))
"""

THROUGHPUT = """
import json, sys, time, torch
torch.set_num_threads(1)
kind, files = sys.argv[1], json.loads(sys.argv[2])
mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
if kind.startswith("ours"):
    from convnextv2_hf.training.arguments import FinetuningArguments
    from convnextv2_hf.training.data.transforms import FinetuneTransform, PretrainTransform, sample_generator
    from convnextv2_hf.training.data.decoding import open_image_header
    if kind == "ours-finetune":  # the reference recipe's: RandAugment rand-m9-mstd0.5-inc1, erasing 0.25
        transform = FinetuneTransform.from_recipe(224, mean, std, FinetuningArguments())
    else:  # what run_fcmae.py's workers do: uint8 crops, normalised on the training device
        transform = PretrainTransform(224, mean, std, uint8=True)
    def one(i, path):
        return transform(open_image_header({"path": path, "bytes": None}), sample_generator(0, 0, i))
else:
    from PIL import Image
    from torchvision import transforms
    crop = [transforms.RandomResizedCrop(224, scale=(0.2 if kind == "torchvision" else 0.08, 1.0), interpolation=3),
            transforms.RandomHorizontalFlip()]
    tail = [transforms.ToTensor(), transforms.Normalize(mean, std)]
    if kind == "torchvision-finetune":  # torchvision's nearest to timm's: RandAugment(2, 9), erasing 0.25
        transform = transforms.Compose(crop + [transforms.RandAugment(2, 9)] + tail + [transforms.RandomErasing(0.25)])
    else:
        transform = transforms.Compose(crop + tail)
    def one(i, path):
        with open(path, "rb") as handle:
            return transform(Image.open(handle).convert("RGB"))
for i, path in enumerate(files[:4]):
    one(i, path)
started, count = time.perf_counter(), 0
while time.perf_counter() - started < 4:
    for i, path in enumerate(files):
        one(i, path)
    count += len(files)
print(json.dumps({"images_per_s": count / (time.perf_counter() - started)}))
"""


# --------------------------------------------------------------------------------------------- data


def synthetic_folder(root: Path, images: int, classes: int = 100) -> Path:
    """`images` small JPEGs in `classes` class folders (start-up cost is per file, not per pixel)."""
    import numpy as np
    from PIL import Image

    if (root / "done").exists():
        return root
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(buffer, "JPEG")
    for index in range(images):
        folder = root / f"class{index % classes:03d}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{index}.jpg").write_bytes(buffer.getvalue())
    (root / "done").write_text("")
    return root


def synthetic_shards(folder: Path, root: Path, kind: str) -> Path:
    from convnextv2_hf.training.data.shard_writer import write_shards

    if not (root / "classes.json").exists():
        write_shards(str(folder), str(root), kind, images_per_shard=1000)
    return root


def photos(root: Path, size: tuple[int, int], count: int) -> list[str]:
    """Photo-like JPEGs (smooth gradients, blobs, sensor noise) of one size, quality 90."""
    import numpy as np
    from PIL import Image

    root.mkdir(parents=True, exist_ok=True)
    paths = []
    for seed in range(count):
        path = root / f"{size[0]}x{size[1]}-{seed}.jpg"
        if not path.exists():
            rng = np.random.default_rng(seed)
            y, x = np.mgrid[0:size[1], 0:size[0]] / max(size)
            pixels = np.stack([np.sin(6 * x + 2 * y + seed), np.cos(5 * y - 3 * x), np.sin(9 * x * y)], -1) * 60 + 120
            for _ in range(8):
                cy, cx, r = rng.uniform(0, 1, 3) * (1, 1, 0.2)
                pixels[(y - cy) ** 2 + (x - cx) ** 2 < r ** 2] = rng.uniform(0, 255, 3)
            pixels = np.clip(pixels + rng.normal(0, 6, pixels.shape), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(path, quality=90)
        paths.append(str(path))
    return paths


# --------------------------------------------------------------------------------------------- measurements


def seconds(command: list[str], cold: bool = False) -> tuple[float, float]:
    """Wall time of `command` (to its first optimizer step, and for ours the save after it), and the time from the
    end of its imports to its first optimizer step (the slowest process's), recorded by `first_step.py`."""
    with tempfile.TemporaryDirectory() as steps:
        if cold:
            drop_page_cache()
        started = time.time()
        result = subprocess.run(command, capture_output=True, text=True, env=ENV | {"FIRST_STEP_DIR": steps},
                                stdin=subprocess.DEVNULL)
        wall = time.time() - started
        if result.returncode != 0:
            raise RuntimeError(f"{command[:4]}: {(result.stderr.strip().splitlines() or ['?'])[-1]}")
        return wall, max(float(path.read_text()) for path in Path(steps).iterdir())


OURS_IMPORTS = "accelerate,datasets,transformers,transformers.trainer,convnextv2_hf.training.pretrain," \
               "convnextv2_hf.training.finetune"
TORCHVISION_IMPORTS = "torchvision,torchvision.datasets,torchvision.transforms"


def startup_commands(folder: Path, shards: dict[str, Path], out: Path) -> dict[str, list[str]]:
    """Each command, run through `first_step.py` (after the imports named there, timed to the first step)."""
    timed = [str(HERE / "first_step.py"), OURS_IMPORTS]
    common = ["--config_overrides", TINY_MODEL, "--image_size", "32", "--per_device_train_batch_size", "64",
              "--overwrite_output_dir"]
    pretrain = [*timed, str(HERE.parent / "examples/pretraining/run_fcmae.py"), *common, "--max_train_steps", "1"]
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    reference = out.parent / "torchvision_startup.py"
    reference.write_text(TORCHVISION_STARTUP)
    return {
        "run_fcmae.py, folder": [sys.executable, *pretrain, "--train_dir", str(folder), "--output_dir", str(out / "a")],
        "run_fcmae.py, folder, 2 processes": [*launch, *pretrain, "--train_dir", str(folder), "--output_dir",
                                              str(out / "b")],
        "run_fcmae.py, webdataset shards": [sys.executable, *pretrain, "--train_files",
                                            str(shards["webdataset"] / "*.tar"), "--output_dir", str(out / "c")],
        "run_fcmae.py, parquet shards": [sys.executable, *pretrain, "--train_files",
                                         str(shards["parquet"] / "*.parquet"), "--output_dir", str(out / "d")],
        "run_finetune.py, folder": [sys.executable, *timed, str(HERE.parent / "examples/classification/run_finetune.py"),
                                    *common, "--train_dir", str(folder), "--output_dir", str(out / "e"), "--max_steps",
                                    "1", "--eval_strategy", "no", "--save_strategy", "no", "--report_to", "none",
                                    "--max_eval_samples", "256"],
        "run_finetune.py, webdataset shards": [
            sys.executable, *timed, str(HERE.parent / "examples/classification/run_finetune.py"), *common,
            "--train_files", str(shards["webdataset"] / "*.tar"), "--validation_files", str(shards["webdataset"] / "*.tar"),
            "--output_dir", str(out / "f"), "--max_steps", "1", "--eval_strategy", "no", "--save_strategy", "no",
            "--report_to", "none", "--max_eval_samples", "256"],
        "torchvision ImageFolder": [TORCHVISION_PYTHON, str(HERE / "first_step.py"), TORCHVISION_IMPORTS,
                                    str(reference), str(folder), "2"],
    }


def startup_times(sizes: list[int], work: Path, runs: int = 5,
                  cold: bool = False) -> dict[tuple[str, int], tuple[float, float]]:
    """(command, size) -> the best of `runs` runs' (wall seconds, seconds from imports to the first step); the first
    warm run also warms the page cache and runs this machine's once-only checks, the best damps a shared machine's
    noise. `cold`: the kernel's caches are dropped before each run (images, folders, libraries: all read from disk)."""
    times = {}
    for size in sizes:
        folder = synthetic_folder(work / f"images-{size}", size)
        shards = {kind: synthetic_shards(folder, work / f"{kind}-{size}", kind) for kind in ("webdataset", "parquet")}
        for name, command in startup_commands(folder, shards, work / f"out-{size}").items():
            measured = [seconds(command, cold) for _ in range(runs)]
            times[name, size] = tuple(min(column) for column in zip(*measured))
            print(f"start-up{' (cold)' if cold else ''} {name} {size}: " +
                  ", ".join(f"{wall:.1f} ({step:.2f})" for wall, step in measured) + " s", file=sys.stderr)
    return times


DROP_CACHES = Path("/proc/sys/vm/drop_caches")


def can_drop_page_cache() -> bool:
    return DROP_CACHES.exists() and os.access(DROP_CACHES, os.W_OK)


def drop_page_cache() -> None:
    os.sync()
    DROP_CACHES.write_text("3")  # page cache, and the directory entries and inodes a listing would find cached


def run_json(python: str, code: str, *args: str) -> dict:
    result = subprocess.run([python, "-c", code, *args], capture_output=True, text=True, env=ENV,
                            stdin=subprocess.DEVNULL)
    if result.returncode != 0:
        raise RuntimeError(result.stderr.strip().splitlines()[-1])
    return json.loads(result.stdout.strip().splitlines()[-1])


def fmt(value: float, digits: int = 1) -> str:
    return f"{value:,.{digits}f}"


# --------------------------------------------------------------------------------------------- section


def data_section(args, common: dict) -> list[str]:
    """Start-up slope (warm and cold page cache), index memory and per-worker throughput, ours against torchvision
    `ImageFolder`."""
    work = Path(tempfile.gettempdir(), "convnextv2-hf-data-bench")  # kept: the images are made once
    sizes, tables, lines = args.data_sizes, args.data_tables, []
    if "startup" in tables:
        lines += startup_table(startup_times(sizes, work), sizes)
        if can_drop_page_cache():
            lines += startup_table(startup_times(sizes, work, runs=2, cold=True), sizes, cold=True)
        else:
            lines += ["Cold page cache: not measured (dropping the page cache needs root).", ""]
    if "memory" in tables:
        lines += index_memory_table(work / f"images-{sizes[1]}", sizes[1])
    if "throughput" in tables:
        lines += throughput_table(work)
    return lines


def startup_intro(sizes: list[int], cold: bool) -> list[str]:
    if cold:
        return ["### The same from a cold page cache", "",
                "The page cache and the directory-entry and inode caches dropped before each run (`echo 3 > "
                "/proc/sys/vm/drop_caches`): the folder listing, the first images and the libraries all come from "
                "disk. Best of two runs.", ""]
    return [f"## Start-up as the data grow: launch to the first optimizer step ({sizes[0]:,} and {sizes[1]:,} images)",
            "", "Synthetic 64x48 JPEGs in 100 class folders, and the same images as webdataset / parquet shards of "
            "1,000 (`convnextv2-hf write-shards`); page cache warm, the best of five runs. Ours include a tiny model's "
            "save after the step (fine-tuning also evaluates 256 held-out images); torchvision `ImageFolder` + "
            "`DataLoader` (2 workers) + one step of a tiny model is the reference's data path. Wall: launch to exit. "
            "After imports: from the end of importing torch, transformers, datasets, accelerate and our modules "
            "(torch and torchvision for torchvision) to the first optimizer step, in the slowest process "
            "(`benchmarks/first_step.py`): the imports cost the same at any size and jitter by more than the data "
            "does, so the slope is fitted on this time from the two sizes; the ratio is ours over torchvision's, "
            "and the extrapolation is the wall time at the first size plus the slope.", ""]


def startup_table(times: dict, sizes: list[int], cold: bool = False) -> list[str]:
    base = "torchvision ImageFolder"
    slope = {name: (times[name, sizes[1]][1] - times[name, sizes[0]][1]) / (sizes[1] - sizes[0]) for name, _ in times}
    lines = startup_intro(sizes, cold)
    lines += ["| command | " + " | ".join(f"wall, {size:,} (s)" for size in sizes) + " | " +
             " | ".join(f"after imports, {size:,} (s)" for size in sizes) + " | s per 100,000 images | "
             "slope / torchvision | " + " | ".join(f"{name} (s)" for name in IMAGENET) + " |", "|---" * 9 + "|"]
    for name in dict.fromkeys(name for name, _ in times):
        at = {label: times[name, sizes[0]][0] + max(slope[name], 0) * (n - sizes[0]) for label, n in IMAGENET.items()}
        ratio = slope[name] / slope[base] if slope[base] > 0 else float("nan")
        lines.append(f"| {name} | " + " | ".join(fmt(times[name, size][0]) for size in sizes) + " | " +
                     " | ".join(fmt(times[name, size][1], 2) for size in sizes) +
                     f" | {fmt(slope[name] * 1e5, 2)} | {fmt(ratio, 2)}x | " +
                     " | ".join(fmt(value, 0) for value in at.values()) + " |")
    return lines + [""]


def index_memory_table(folder: Path, size: int) -> list[str]:
    ours = run_json(sys.executable, INDEX_RSS, "ours", str(folder))
    mapped = run_json(sys.executable, INDEX_RSS, "ours-mapped", str(folder))
    theirs = run_json(TORCHVISION_PYTHON, INDEX_RSS, "torchvision", str(folder))
    lines = [f"## Memory of the file index ({size:,} images)", "",
             "Growth of the process's resident memory from listing the folder: ours an Arrow table (paths and "
             "labels), torchvision's `ImageFolder` a Python list of (path, label) tuples (every process lists the "
             "folder). In a multi-process launch only each machine's first process lists it; the others "
             "memory-map the index it wrote: resident memory grows by "
             f"{fmt(mapped['mib'])} MiB and private memory by {fmt(mapped['private_mib'])} MiB in such a process "
             "(the pages a run reads are the page cache's, shared by the machine's processes).", "",
             "| index | MiB | " + " | ".join(f"{name} (MiB, extrapolated)" for name in IMAGENET) + " |", "|---|---|---|---|"]
    for name, result in (("ours (Arrow), first process", ours), ("ours, other processes (memory-mapped; private memory)",
                                                             {**mapped, "mib": mapped["private_mib"]}),
                         ("torchvision ImageFolder", theirs)):
        per_image = result["mib"] / result["images"]
        lines.append(f"| {name} | {fmt(result['mib'])} | " +
                     " | ".join(fmt(per_image * n, 0) for n in IMAGENET.values()) + " |")
    return lines + [""]


def throughput_table(work: Path) -> list[str]:
    lines = ["## Throughput of one data-loading worker (images/s)", "",
             "One thread, photo-like JPEGs (quality 90). Pre-training: decode + RandomResizedCrop(224, scale 0.2-1, "
             "bicubic) + horizontal flip, to uint8 (ours: `run_fcmae.py` normalises on the training device) or "
             "normalised floats (torchvision's transforms, the reference's `transform_train`). Fine-tuning: the "
             "reference recipe's crop (scale 0.08-1) and flip, RandAugment `rand-m9-mstd0.5-inc1`, normalisation "
             "and random erasing 0.25 (ours), against torchvision's nearest (`RandAugment(2, 9)`, "
             "`RandomErasing(0.25)`; the reference uses timm's, which needs torchvision too). Ours decodes a JPEG "
             "at 1/2-1/8 scale when the crop box is 2-8 times the output (`Image.draft`, same box), and draws the "
             "FCMAE mask in training (not included here). Three rounds of 4 s each, ours and torchvision's taking "
             "turns; the best round of each.", "",
             "| pipeline | images | ours | torchvision | ours / torchvision |", "|---|---|---|---|---|"]
    for pipeline, ours_kind, their_kind in (("pre-training", "ours", "torchvision"),
                                            ("fine-tuning", "ours-finetune", "torchvision-finetune")):
        for size, count in (((500, 375), 64), ((3000, 2000), 12)):
            files = json.dumps(photos(work / "photos", size, count))
            rounds = [(run_json(sys.executable, THROUGHPUT, ours_kind, files)["images_per_s"],
                       run_json(TORCHVISION_PYTHON, THROUGHPUT, their_kind, files)["images_per_s"]) for _ in range(3)]
            print(f"throughput {pipeline} {size}: " + ", ".join(f"{a:.0f}/{b:.0f}" for a, b in rounds), file=sys.stderr)
            ours, theirs = (max(column) for column in zip(*rounds))
            lines.append(f"| {pipeline} | {size[0]}x{size[1]} | {fmt(ours)} | {fmt(theirs)} | {fmt(ours / theirs, 2)}x |")
    return lines + [""]
