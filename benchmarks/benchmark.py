"""Speed and memory of FCMAE pre-training backends and of classifier inference, as one markdown report.

    python benchmarks/benchmark.py                         # CPU, 2 threads, writes benchmarks/results-cpu.md
    python benchmarks/benchmark.py --device cuda --bf16    # GPU with bf16 autocast
    python benchmarks/benchmark.py --sections recipe_cost --output benchmarks/results-cpu-recipe-cost.md
    python benchmarks/benchmark.py --sections data --output benchmarks/results-cpu-data.md    # see data_pipeline.py
    python benchmarks/benchmark.py --device cuda --sections gpu --output benchmarks/results-cuda.md  # see gpu_step.py

Every figure is the median over `--repeats` timed runs after `--warmup` runs. Each configuration runs in a fresh
subprocess. Peak memory is measured in one more process per configuration, over one training step (the first, so
it includes the optimizer state): on CPU the growth of the process's peak resident memory over its size before the
step, with glibc's mmap threshold fixed at 64 KiB so freed tensors leave the resident set (that slows allocation,
hence the separate process); on GPU `torch.cuda.max_memory_allocated`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from data_pipeline import data_section  # noqa: E402
from gpu_step import gpu_section  # noqa: E402


# ------------------------------------------------------------------------------------------------ workers


def rss_mib() -> float:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def seconds(call, device: str):
    """Wall-clock seconds of `call()` (the device synchronised before and after) and its result."""
    import torch

    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    result = call()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start, result


def timed(step, device: str, warmup: int, repeats: int) -> list[float]:
    return [seconds(step, device)[0] for _ in range(warmup + repeats)][warmup:]


def training_step(model, optimizer, job: dict, **inputs):
    """One forward (under bf16 autocast with `job["bf16"]`), backward and optimizer step, as a callable to time."""
    import torch

    def step():
        with torch.autocast(device_type=job["device"], dtype=torch.bfloat16, enabled=job["bf16"]):
            loss = model(**inputs).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def train_worker(job: dict) -> dict:
    """One FCMAE training step (forward, backward, AdamW step) per call, for one preset/backend/mask ratio."""
    import torch

    from convnextv2_hf import ConvNextV2Config, ConvNextV2ForMaskedImageModeling
    from convnextv2_hf.masking import random_masking

    device, batch, size = job["device"], job["batch_size"], job["image_size"]
    torch.manual_seed(0)
    config = ConvNextV2Config.from_preset(job["preset"], sparse_backend=job["backend"], mask_ratio=0.6)
    model = ConvNextV2ForMaskedImageModeling(config).to(device).train()
    if job.get("gradient_checkpointing"):
        model.gradient_checkpointing_enable()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.05)
    images = torch.randn(batch, 3, size, size, device=device)
    grid = (size // config.mask_cell_size,) * 2
    cells = grid[0] * grid[1]
    if job["mask_ratio"] > 0:
        mask = random_masking(batch, grid, job["mask_ratio"], generator=torch.Generator().manual_seed(0))
    else:  # the loss needs one masked cell per batch: mask a single cell of the first image
        mask = torch.zeros(batch, cells, dtype=torch.bool)
        mask[0, 0] = True
    mask = mask.to(device)

    step = training_step(model, optimizer, job, pixel_values=images, bool_masked_pos=mask)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated() / 2**20
    else:
        base = rss_mib()
    times = timed(step, device, job["warmup"], job["repeats"])
    peak = torch.cuda.max_memory_allocated() / 2**20 - base if device == "cuda" else peak_rss_mib() - base
    return {"images_per_s": batch / statistics.median(times), "peak_mib": peak, "visible": float((~mask).float().mean())}


def finetune_worker(job: dict) -> dict:
    """One fine-tuning step of a 1000-class classifier (forward, backward, AdamW), and the recipe's augmentation
    (RandomResizedCrop, flip, RandAugment, erasing) of a 500x375 image, per image, in one process."""
    import numpy as np
    import torch
    from PIL import Image

    from convnextv2_hf import ConvNextV2Config, ConvNextV2ForImageClassification
    from convnextv2_hf.training.arguments import FinetuningArguments
    from convnextv2_hf.training.data.transforms import FinetuneTransform, sample_generator

    device, batch, size = job["device"], job["batch_size"], job["image_size"]
    torch.manual_seed(0)
    model = ConvNextV2ForImageClassification(ConvNextV2Config.from_preset(job["preset"], num_labels=1000,
                                                                          drop_path_rate=0.1)).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05)
    images, labels = torch.randn(batch, 3, size, size, device=device), torch.randint(0, 1000, (batch,), device=device)

    step_times = timed(training_step(model, optimizer, job, pixel_values=images, labels=labels), device,
                       job["warmup"], job["repeats"])
    photo = Image.fromarray(np.random.default_rng(0).integers(0, 255, (375, 500, 3), dtype=np.uint8))
    transform = FinetuneTransform.from_recipe(size, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225),
                                              FinetuningArguments())
    started = time.perf_counter()
    for index in range(64):
        transform(photo, sample_generator(0, 0, index))
    return {"images_per_s": batch / statistics.median(step_times), "augment_per_s": 64 / (time.perf_counter() - started)}


def encoder_worker(job: dict) -> dict:
    """Sparse-encoder time per source image under a masking strategy (forward only, timed inside the model)."""
    import torch

    from convnextv2_hf import ConvNextV2Config, ConvNextV2ForMaskedImageModeling
    from convnextv2_hf.masking import random_masking
    from convnextv2_hf.sparse_backends import SPARSE_BACKENDS

    device, batch, size = job["device"], job["batch_size"], job["image_size"]
    config = ConvNextV2Config.from_preset(job["preset"], sparse_backend=job["backend"], mask_strategy=job["strategy"],
                                          sparse_grn_scope="sample")
    model = ConvNextV2ForMaskedImageModeling(config).to(device).eval()
    images = torch.randn(batch, 3, size, size, device=device)
    grid = (size // config.mask_cell_size,) * 2
    mask = random_masking(batch, grid, job["mask_ratio"], generator=torch.Generator().manual_seed(0)).to(device)
    backend_class = SPARSE_BACKENDS[job["backend"]]
    original, spent = backend_class.encode, []

    def timed_encode(self, *args, **kwargs):
        elapsed, result = seconds(lambda: original(self, *args, **kwargs), device)
        spent.append(elapsed)
        return result

    backend_class.encode = timed_encode
    with torch.no_grad(), torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=job["bf16"]):
        for _ in range(job["warmup"] + job["repeats"]):
            model(images, bool_masked_pos=mask)
    per_call = statistics.median(spent[job["warmup"]:])
    return {"images_per_s": batch / per_call}


def inference_worker(job: dict) -> dict:
    """Classifier inference images/s for one implementation, on weights shared through a saved checkpoint."""
    import torch

    device, batch, size = job["device"], job["batch_size"], job["image_size"]
    torch.manual_seed(0)
    images = torch.randn(batch, 3, size, size, device=device)
    checkpoint = job["checkpoint"]
    impl = job["impl"]
    if impl.startswith("ours"):
        from convnextv2_hf import ConvNextV2ForImageClassification
        from convnextv2_hf.inference import optimize_for_inference

        model = optimize_for_inference(
            ConvNextV2ForImageClassification.from_pretrained(checkpoint).to(device), compile=impl == "ours+compile"
        )
        forward = lambda: model(images).logits  # noqa: E731
    elif impl == "transformers":
        import transformers

        model = transformers.ConvNextV2ForImageClassification.from_pretrained(checkpoint).to(device).eval()
        forward = lambda: model(images).logits  # noqa: E731
    elif impl == "timm":
        import timm

        from convnextv2_hf import ConvNextV2ForImageClassification
        from convnextv2_hf.convert_convnextv2 import from_our_layout

        ours = ConvNextV2ForImageClassification.from_pretrained(checkpoint)
        model = timm.create_model(f"convnextv2_{job['preset']}", num_classes=ours.config.num_labels)
        model.load_state_dict(from_our_layout(ours.state_dict(), "timm"))
        model = model.to(device).eval()
        forward = lambda: model(images)  # noqa: E731
    else:
        raise ValueError(impl)

    def step():
        with torch.inference_mode(), torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=job["bf16"]):
            step.logits = forward()

    times = timed(step, device, job["warmup"], job["repeats"])
    torch.save(step.logits.float().cpu(), job["logits_out"])
    return {"images_per_s": batch / statistics.median(times)}


# ------------------------------------------------------------------------------------------------ driver


def run_job(job: dict, for_memory: bool = False) -> dict:
    env = dict(os.environ, TRANSFORMERS_VERBOSITY="error", HF_HUB_OFFLINE="1")
    if job["device"] == "cpu":
        env.update(OMP_NUM_THREADS=str(job["threads"]), MKL_NUM_THREADS=str(job["threads"]))
    if job["device"] == "cpu" and for_memory:
        # Every allocation above 64 KiB gets its own mapping, returned to the system when freed: the process's peak
        # resident memory then follows the live tensors instead of what glibc's heap keeps after a free. It slows
        # allocation down, so speed is measured in another process without it.
        env["MALLOC_MMAP_THRESHOLD_"] = "65536"
    result = subprocess.run(
        [sys.executable, __file__, "--worker", json.dumps(job)], env=env, capture_output=True, text=True
    )
    if result.returncode != 0:
        return {"error": result.stderr.strip().splitlines()[-1] if result.stderr.strip() else "failed"}
    return json.loads(result.stdout.strip().splitlines()[-1])


def run_jobs(keys: list[tuple], desc: str, job_for, memory: bool = False) -> dict[tuple, dict]:
    """Run `job_for(*key)` for every key in its own subprocess, with a progress bar. With `memory`, each key also
    runs once more (one step) in a process set up to measure peak memory, which gives the `peak_mib`."""
    from tqdm.auto import tqdm

    results = {}
    for key in tqdm(keys, desc=desc):
        job = job_for(*key)
        results[key] = run_job(job)
        if memory and "error" not in results[key]:
            measured = run_job(dict(job, warmup=0, repeats=1), for_memory=True)
            results[key]["peak_mib"] = measured.get("peak_mib", float("nan"))
    return results


def available_backends() -> list[str]:
    from convnextv2_hf.sparse_backends import minkowski_engine_available

    return ["dense", "gather"] + (["minkowski"] if minkowski_engine_available() else [])


def fmt(value: float, digits: int = 1) -> str:
    return f"{value:.{digits}f}"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads")
    parser.add_argument("--presets", nargs="+", default=["atto", "tiny"])
    parser.add_argument("--sweep_preset", default="tiny")
    parser.add_argument("--mask_ratios", nargs="+", type=float, default=[0.0, 0.3, 0.6, 0.75, 0.9])
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--checkpointing_batch_size", type=int, default=64)
    parser.add_argument("--image_size", type=int, default=224)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--sections", nargs="+", default=DEFAULT_SECTIONS, choices=list(SECTIONS))
    parser.add_argument("--quick", action="store_true", help="gpu section: tiny sizes on the CPU (the test suite's run)")
    parser.add_argument("--gpu_presets", nargs="+", default=["tiny", "base"], help="gpu section: model sizes")
    parser.add_argument("--gpu_batches", nargs="+", type=int, default=[64, 256], help="gpu section: images per GPU")
    parser.add_argument("--gpu_time_budget", type=float, default=300,
                        help="gpu section: seconds for its training steps; compiled configurations left then are skipped")
    parser.add_argument("--gpu_compile_mode", default="default", choices=["default", "reduce-overhead", "max-autotune"],
                        help="gpu section: torch.compile mode of the compiled rows (reduce-overhead: CUDA graphs)")
    parser.add_argument("--data_tables", nargs="+", default=["startup", "memory", "throughput"],
                        choices=["startup", "memory", "throughput"], help="data section: which tables")
    parser.add_argument("--data_sizes", nargs=2, type=int, default=[10_000, 100_000])
    parser.add_argument("--output", default=None, help="markdown file (default benchmarks/results-<device>.md)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    return parser.parse_args()


def run_worker(spec: str) -> None:
    """Inside a benchmark subprocess: run one job and print its result as JSON."""
    import torch

    job = json.loads(spec)
    if job["device"] == "cpu":
        torch.set_num_threads(job["threads"])
    workers = {"train": train_worker, "encoder": encoder_worker, "inference": inference_worker,
               "finetune": finetune_worker}
    print(json.dumps(workers[job["kind"]](job)))


def header(args, common: dict) -> list[str]:
    import torch

    cpu = platform.processor() or platform.machine()
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU ({cpu}), {args.threads} threads"
    return [f"# Benchmarks: {device_name}", "",
            f"torch {torch.__version__}; batch {args.batch_size}, {args.image_size} px, "
            f"{'bf16 autocast' if args.bf16 else 'fp32'}; median of {args.repeats} runs after {args.warmup} warm-up. "
            f"Backends present: {', '.join(common['backends'])}.", ""]


def train_section(args, common: dict) -> list[str]:
    jobs = [(p, b) for p in args.presets for b in common["backends"]]
    results = run_jobs(jobs, "training step", lambda preset, backend: dict(
        common["job"], kind="train", preset=preset, backend=backend, mask_ratio=0.6), memory=True)
    lines = ["## FCMAE training step (forward + backward + AdamW), mask ratio 0.6", "",
             "| model | backend | images/s | vs dense | peak memory (MiB) | vs dense |", "|---|---|---|---|---|---|"]
    for preset, backend in jobs:
        r, d = results[preset, backend], results[preset, "dense"]
        if "error" in r:
            lines.append(f"| {preset} | {backend} | error: {r['error']} | | | |")
            continue
        lines.append(f"| {preset} | {backend} | {fmt(r['images_per_s'], 2)} | "
                     f"{fmt(r['images_per_s'] / d['images_per_s'], 2)}x | {fmt(r['peak_mib'], 0)} | "
                     f"{fmt(r['peak_mib'] / d['peak_mib'], 2)}x |")
    return lines + [""]


def sweep_section(args, common: dict) -> list[str]:
    backends = common["backends"]
    jobs = [(ratio, b) for ratio in args.mask_ratios for b in backends]
    results = run_jobs(jobs, "mask-ratio sweep", lambda ratio, backend: dict(
        common["job"], kind="train", preset=args.sweep_preset, backend=backend, mask_ratio=ratio))
    lines = [f"## Mask-ratio sweep ({args.sweep_preset}, training step images/s)", "",
             "| mask ratio | " + " | ".join(backends) + " | " + " | ".join(f"{b} vs dense" for b in backends[1:]) + " |",
             "|---" * (2 * len(backends)) + "|"]
    for ratio in args.mask_ratios:
        row = [results[ratio, b].get("images_per_s", float("nan")) for b in backends]
        label = f"{ratio}" if ratio > 0 else "0.0 (one cell masked: the loss needs one)"
        lines.append(f"| {label} | " + " | ".join(fmt(v, 2) for v in row) + " | "
                     + " | ".join(f"{fmt(v / row[0], 2)}x" for v in row[1:]) + " |")
    return lines + [""]


def checkpointing_section(args, common: dict) -> list[str]:
    """Peak memory and speed of an FCMAE training step with and without gradient checkpointing."""
    batch = args.checkpointing_batch_size
    jobs = [(p, on) for p in args.presets[-1:] for on in (False, True)]
    results = run_jobs(jobs, "gradient checkpointing", lambda preset, on: dict(
        common["job"], kind="train", preset=preset, backend="gather", mask_ratio=0.6, batch_size=batch,
        gradient_checkpointing=on), memory=True)
    lines = [f"## Gradient checkpointing (FCMAE training step, gather backend, mask ratio 0.6, batch {batch})", "",
             "| model | gradient checkpointing | images/s | peak memory (MiB) | memory vs off |", "|---|---|---|---|---|"]
    for preset, on in jobs:
        r, off = results[preset, on], results[preset, False]
        if "error" in r:
            lines.append(f"| {preset} | {'on' if on else 'off'} | error: {r['error']} | | |")
            continue
        lines.append(f"| {preset} | {'on' if on else 'off'} | {fmt(r['images_per_s'], 2)} | {fmt(r['peak_mib'], 0)} | "
                     f"{fmt(r['peak_mib'] / off['peak_mib'], 2)}x |")
    return lines + [""]


def mixmae_section(args, common: dict) -> list[str]:
    jobs = [(p, strategy) for p in args.presets for strategy in ("fcmae", "mixmae")]
    results = run_jobs(jobs, "masking strategies", lambda preset, strategy: dict(
        common["job"], kind="encoder", preset=preset, backend="gather", strategy=strategy, mask_ratio=0.6))
    lines = ["## Encoder throughput by masking strategy (gather backend, mask ratio 0.6, forward only)", "",
             "MixMAE encodes every cell of each source image (its own visible cells plus the cells it fills in its "
             "partner), FCMAE only the 40 % visible ones.", "",
             "| model | strategy | source images/s | vs FCMAE |", "|---|---|---|---|"]
    for preset, strategy in jobs:
        r, f = results[preset, strategy], results[preset, "fcmae"]
        if "error" in r:
            lines.append(f"| {preset} | {strategy} | error: {r['error']} | |")
            continue
        lines.append(f"| {preset} | {strategy} | {fmt(r['images_per_s'], 2)} | "
                     f"{fmt(r['images_per_s'] / f['images_per_s'], 2)}x |")
    return lines + [""]


def inference_implementations() -> list[str]:
    impls = ["transformers", "ours", "ours+compile"]
    try:
        import timm  # noqa: F401

        impls.append("timm")
    except ImportError:
        pass
    return impls


def inference_preset(preset: str, impls: list[str], common: dict) -> dict[str, dict]:
    """Each implementation on the same randomly initialised weights (non-zero GRN), logits kept for comparison."""
    import tempfile

    import torch
    from tqdm.auto import tqdm

    from convnextv2_hf import ConvNextV2Config, ConvNextV2ForImageClassification

    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        model = ConvNextV2ForImageClassification(ConvNextV2Config.from_preset(preset, num_labels=1000))
        with torch.no_grad():
            for name, p in model.named_parameters():
                if ".grn." in name:
                    p.normal_(0, 0.1)
        model.save_pretrained(tmp)
        results = {}
        for impl in tqdm(impls, desc=f"inference {preset}"):
            out = os.path.join(tmp, f"{impl}.pt")
            results[impl] = run_job(dict(common["job"], kind="inference", preset=preset, impl=impl, checkpoint=tmp,
                                         logits_out=out))
            if "error" not in results[impl]:
                results[impl]["logits"] = torch.load(out)
    return results


def inference_section(args, common: dict) -> list[str]:
    impls = inference_implementations()
    lines = [f"## Classifier inference (batch {args.batch_size}, {args.image_size} px, same weights)", "",
             "| model | implementation | images/s | vs transformers | max abs logit diff vs transformers |",
             "|---|---|---|---|---|"]
    for preset in args.presets:
        results = inference_preset(preset, impls, common)
        base = results["transformers"]
        for impl in impls:
            r = results[impl]
            if "error" in r:
                lines.append(f"| {preset} | {impl} | error: {r['error']} | | |")
                continue
            diff = (r["logits"] - base["logits"]).abs().max().item()
            lines.append(f"| {preset} | {impl} | {fmt(r['images_per_s'], 2)} | "
                         f"{fmt(r['images_per_s'] / base['images_per_s'], 2)}x | {diff:.1e} |")
    return lines + [""]


IMAGENET_1K_IMAGES = 1_281_167
RECIPE_BATCH = {"atto": 8, "femto": 8, "pico": 8, "nano": 8, "tiny": 8, "base": 4, "large": 2, "huge": 2}


def recipe_cost_section(args, common: dict) -> list[str]:
    """What one ImageNet-1k epoch of each size's fine-tuning costs here, and each published recipe in all."""
    from convnextv2_hf.training.recipes import FINETUNE_RECIPES, SIZES

    results = run_jobs([(size,) for size in SIZES], "recipe cost", lambda size: dict(
        common["job"], kind="finetune", preset=size, batch_size=RECIPE_BATCH[size], warmup=1, repeats=2))
    lines = ["## Fine-tuning cost per size (one ImageNet-1k epoch, 1,281,167 images, 224 px)", "",
             "Training step of a 1000-class classifier (forward, backward, AdamW, drop path 0.1) at the batch in the "
             "table (median of 2 steps after 1 warm-up; the header's batch and repeats do not apply here), and the "
             "recipe's augmentation (crop, flip, RandAugment, erasing) of a 500x375 image in one process. The "
             "reference ran its recipes on 4 nodes x 8 GPUs (TRAINING.md).", "",
             "| size | batch | images/s (step) | hours per epoch (step) | augmentation images/s per process | "
             "published recipe | days for the recipe here |", "|---|---|---|---|---|---|---|"]
    for size in SIZES:
        r = results[(size,)]
        if "error" in r:
            lines.append(f"| {size} | {RECIPE_BATCH[size]} | error: {r['error']} | | | | |")
            continue
        hours = IMAGENET_1K_IMAGES / r["images_per_s"] / 3600
        recipe = FINETUNE_RECIPES.get(size)
        total = f"{recipe['num_train_epochs']} epochs" if recipe else "none published"
        days = fmt(hours * recipe["num_train_epochs"] / 24, 0) if recipe else "-"
        lines.append(f"| {size} | {RECIPE_BATCH[size]} | {fmt(r['images_per_s'], 2)} | {fmt(hours, 1)} | "
                     f"{fmt(r['augment_per_s'], 0)} | {total} | {days} |")
    return lines + [""]


SECTIONS = {"train": train_section, "sweep": sweep_section, "checkpointing": checkpointing_section,
            "mixmae": mixmae_section, "inference": inference_section, "recipe_cost": recipe_cost_section,
            "data": data_section, "gpu": gpu_section}
DEFAULT_SECTIONS = [name for name in SECTIONS if name != "gpu"]  # gpu: `--device cuda --sections gpu`, or --quick


def main() -> None:
    args = parse_args()
    if args.worker:
        return run_worker(args.worker)
    job = dict(device=args.device, bf16=args.bf16, threads=args.threads, batch_size=args.batch_size,
               image_size=args.image_size, warmup=args.warmup, repeats=args.repeats)
    common = {"job": job, "backends": available_backends()}
    lines = header(args, common)
    for name in args.sections:
        lines += SECTIONS[name](args, common)
    report = "\n".join(lines)
    print(report)
    output = Path(args.output or HERE / f"results-{args.device}{'-bf16' if args.bf16 else ''}.md")
    output.write_text(report)
    print(f"written to {output}")


if __name__ == "__main__":
    main()
