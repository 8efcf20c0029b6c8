"""The GPU section of the benchmark: the FCMAE training step as users run it on a GPU.

    python benchmarks/benchmark.py --device cuda --sections gpu --output benchmarks/results-cuda.md   # < 6 min, H200
    python benchmarks/benchmark.py --sections gpu --quick        # the same code on the CPU, tiny sizes (test suite)

Dense and gather backends x eager and compiled (inductor, fullgraph, static shapes) x tiny and base x 64 and 256
images per GPU, bf16 autocast and fused AdamW: images per second, peak memory, host syncs per step
(`torch.cuda.set_sync_debug_mode`; on the CPU, the aten ops that would sync), then the fine-tuning EMA update, the
host-to-device copy of a batch (uint8 vs float32) and inference against transformers and timm. Everything runs in
one process; each configuration starts from fresh memory statistics.
"""

from __future__ import annotations

import statistics
import sys
import time
import warnings
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))  # the sync counter the test suite uses

FULL = dict(presets=("tiny", "base"), batches=(64, 256), image_size=224, warmup=3, repeats=10, compile="inductor")
QUICK = dict(presets=("quick",), batches=(4,), image_size=64, warmup=1, repeats=2, compile="aot_eager")
QUICK_CONFIG = dict(depths=[1, 1, 2, 1], hidden_sizes=[8, 16, 24, 32], patch_size=2, decoder_hidden_size=16)


def model_config(preset: str, **kwargs):
    from convnextv2_hf import ConvNextV2Config

    if preset == "quick":
        return ConvNextV2Config(**QUICK_CONFIG, **kwargs)
    return ConvNextV2Config.from_preset(preset, **kwargs)


def synchronise(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def median_seconds(step, device: str, warmup: int, repeats: int) -> float:
    for _ in range(warmup):
        step()
    times = []
    for _ in range(repeats):
        synchronise(device)
        start = time.perf_counter()
        step()
        synchronise(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def training_batch(batch_size: int, image_size: int, cell: int, device: str, mask_ratio: float = 0.6) -> dict:
    """Images and masks as the pre-training loader hands them over: collated on the host, copied without blocking."""
    import torch

    from convnextv2_hf.masking import random_masking
    from convnextv2_hf.training.masked_datasets import collate

    cells = (image_size // cell,) * 2
    generator = torch.Generator().manual_seed(0)
    samples = [{"pixel_values": torch.randn(3, image_size, image_size, generator=generator),
                "bool_masked_pos": random_masking(1, cells, mask_ratio, generator=generator)[0]}
               for _ in range(batch_size)]
    batch = collate(samples)
    pin = device == "cuda"
    return {key: value.pin_memory().to(device, non_blocking=True) if pin and torch.is_tensor(value) else value
            for key, value in batch.items()}


def count_syncs(step, device: str) -> int:
    """Host syncs in one call of `step`: CUDA's own count where there is CUDA, else the syncing aten ops."""
    import torch

    if device == "cuda":
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                step()
            finally:
                torch.cuda.set_sync_debug_mode("default")
        return sum("synchroniz" in str(w.message) for w in caught)
    from test_gpu_readiness import SyncCounter

    with SyncCounter() as counter:
        step()
    return len(counter.seen)


def step_job(preset: str, batch_size: int, backend: str, compiled: bool, plan: dict, device: str) -> dict:
    import torch

    from convnextv2_hf import ConvNextV2ForMaskedImageModeling

    torch.manual_seed(0)
    model = ConvNextV2ForMaskedImageModeling(model_config(preset, sparse_backend=backend)).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device == "cuda")
    forward = torch.compile(model, backend=plan["compile"], fullgraph=True, dynamic=False) if compiled else model
    batch = training_batch(batch_size, plan["image_size"], model.config.mask_cell_size, device)

    def forward_backward():
        with torch.autocast(device_type=device, dtype=torch.bfloat16):
            loss = forward(**batch).loss
        loss.backward()

    def step():
        forward_backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    seconds = median_seconds(step, device, plan["warmup"], plan["repeats"])
    peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else float("nan")
    # CUDA counts the whole step (fused AdamW never syncs); on the CPU forward and backward, since the CPU AdamW's
    # step counters are read on the host by design, and a dispatch mode stops dynamo
    syncs = count_syncs(step, device) if device == "cuda" else None if compiled else count_syncs(forward_backward, device)
    return {"images_per_s": batch_size / seconds, "peak_gib": peak, "syncs": syncs}


def ema_job(preset: str, plan: dict, device: str) -> float:
    """Milliseconds of one EMA update of a classifier on `device` (the fine-tuning `--model_ema`)."""
    import torch
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    from convnextv2_hf import ConvNextV2ForImageClassification

    model = ConvNextV2ForImageClassification(model_config(preset, num_labels=1000)).to(device)
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.9999), use_buffers=True)
    return 1000 * median_seconds(lambda: ema.update_parameters(model), device, plan["warmup"], plan["repeats"])


def copy_job(batch_size: int, plan: dict, device: str) -> dict:
    """Milliseconds to copy one batch to the device from pinned memory: uint8 pixels vs float32."""
    import torch

    if device != "cuda":
        return {}
    shape = (batch_size, 3, plan["image_size"], plan["image_size"])
    times = {}
    for dtype in (torch.uint8, torch.float32):
        host = torch.zeros(shape, dtype=dtype).pin_memory()
        times[str(dtype).removeprefix("torch.")] = 1000 * median_seconds(
            lambda: host.to(device, non_blocking=True), device, plan["warmup"], plan["repeats"])
    return times


def inference_job(preset: str, batch_size: int, plan: dict, device: str) -> dict:
    """Classifier images per second under bf16 autocast: ours, transformers' and (where installed) timm's."""
    import torch
    import transformers

    from convnextv2_hf import ConvNextV2ForImageClassification

    config = model_config(preset, num_labels=1000)
    models = {"convnextv2-hf": ConvNextV2ForImageClassification(config),
              "transformers": transformers.ConvNextV2ForImageClassification(
                  transformers.ConvNextV2Config(**{k: getattr(config, k) for k in (
                      "depths", "hidden_sizes", "patch_size", "num_labels")}))}
    try:
        import timm

        if preset != "quick":
            models["timm"] = timm.create_model(f"convnextv2_{preset}", num_classes=1000)
    except ImportError:
        pass
    pixels = torch.randn(batch_size, 3, plan["image_size"], plan["image_size"], device=device)
    results = {}
    for name, model in models.items():
        model = model.to(device).eval()

        @torch.no_grad()
        def infer(model=model, name=name):
            with torch.autocast(device_type=device, dtype=torch.bfloat16):
                return model(pixels) if name == "timm" else model(pixel_values=pixels)

        results[name] = batch_size / median_seconds(infer, device, plan["warmup"], plan["repeats"])
    return results


def gpu_section(args, common: dict) -> list[str]:
    """The section's markdown, for `benchmark.py --sections gpu` (`--quick`: tiny sizes on the CPU)."""
    from tqdm.auto import tqdm

    plan = QUICK if args.quick else FULL
    device = args.device if not args.quick else "cpu"
    rows = [(p, b, backend, compiled) for p in plan["presets"] for b in plan["batches"]
            for backend in ("dense", "gather") for compiled in (False, True)]
    steps = {row: step_job(*row, plan, device) for row in tqdm(rows, desc="GPU section: training steps")}
    lines = ["## FCMAE training step on the GPU" + (" (--quick: tiny model on the CPU)" if args.quick else ""), "",
             f"bf16 autocast, {plan['image_size']} px, mask 0.6, {'fused ' if device == 'cuda' else ''}AdamW; median "
             f"of {plan['repeats']} steps after {plan['warmup']} warm-up; compiled: {plan['compile']}, fullgraph.", "",
             "| model, batch | backend | eager img/s | compiled img/s | gather / dense (eager, compiled) | peak GiB eager "
             "/ compiled | syncs per step eager / compiled |", "|---|---|---|---|---|---|---|"]
    for preset in plan["presets"]:
        for batch in plan["batches"]:
            for backend in ("dense", "gather"):
                eager, compiled = steps[(preset, batch, backend, False)], steps[(preset, batch, backend, True)]
                dense, dense_compiled = steps[(preset, batch, "dense", False)], steps[(preset, batch, "dense", True)]
                ratios = (f"{eager['images_per_s'] / dense['images_per_s']:.2f}x, "
                          f"{compiled['images_per_s'] / dense_compiled['images_per_s']:.2f}x")
                syncs = f"{eager['syncs']} / {'-' if compiled['syncs'] is None else compiled['syncs']}"
                peaks = " / ".join("-" if r["peak_gib"] != r["peak_gib"] else f"{r['peak_gib']:.1f}" for r in (eager, compiled))
                lines.append(f"| {preset} {batch} | {backend} | {eager['images_per_s']:.0f} | "
                             f"{compiled['images_per_s']:.0f} | {ratios} | {peaks} | {syncs} |")
    preset = plan["presets"][-1]
    ema_ms = ema_job(preset, plan, device)
    copies = copy_job(plan["batches"][-1], plan, device)
    inference = inference_job(preset, plan["batches"][-1], plan, device)
    lines += ["", f"EMA update ({preset} classifier, on the model's device): {ema_ms:.2f} ms per step."]
    if copies:
        lines.append(f"Host-to-device copy of {plan['batches'][-1]} images (pinned): " +
                     ", ".join(f"{dtype} {ms:.2f} ms" for dtype, ms in copies.items()) + ".")
    lines.append(f"Inference ({preset}, batch {plan['batches'][-1]}, bf16), images/s: " +
                 ", ".join(f"{name} {rate:.0f}" for name, rate in inference.items()) + ".")
    return lines + [""]
