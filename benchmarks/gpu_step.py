"""The GPU section of the benchmark: the FCMAE training step as users run it on a GPU.

    python benchmarks/benchmark.py --device cuda --sections gpu --output benchmarks/results-cuda.md   # < 6 min, H200
    python benchmarks/benchmark.py --device cuda --sections gpu --gpu_presets tiny --gpu_time_budget 600  # all tiny rows
    python benchmarks/benchmark.py --device cuda --sections gpu --gpu_presets base --gpu_batches 64 \
        --gpu_compile_mode reduce-overhead --output benchmarks/results-cuda-graphs.md   # compiled rows in CUDA graphs
    python benchmarks/benchmark.py --sections gpu --quick        # the same code on the CPU, tiny sizes (test suite)

Dense and gather backends x eager and compiled (inductor, fullgraph, static shapes) x tiny and base x 64 and 256
images per GPU, bf16 autocast and fused AdamW: images per second, peak memory, host syncs per step
(`torch.cuda.set_sync_debug_mode`; on the CPU, the aten ops that would sync), then the fine-tuning EMA update, the
host-to-device copy of a batch (uint8 vs float32) and inference against transformers and timm. Everything runs in
one process; each configuration starts from fresh memory statistics. Compiling base takes about 95 s on an H200,
so all 16 configurations take about 15 minutes; `--gpu_time_budget` (default 300 s) caps the training steps and the
report lists the configurations it left out.
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
    from convnextv2_hf.training.data.masked_datasets import collate

    cells = (image_size // cell,) * 2
    generator = torch.Generator().manual_seed(0)
    samples = [{"pixel_values": torch.randn(3, image_size, image_size, generator=generator),
                "bool_masked_pos": random_masking(1, cells, mask_ratio, generator=generator)[0]}
               for _ in range(batch_size)]
    batch = collate(samples)
    pin = device == "cuda"
    return {key: value.pin_memory().to(device, non_blocking=True) if pin and torch.is_tensor(value) else value
            for key, value in batch.items()}


def count_syncs(step, device: str) -> tuple[int, list[str]]:
    """Host syncs in one call of `step` and where they come from: CUDA's own warnings where there is CUDA (each
    names the Python line that asked), else the aten ops that would sync."""
    import torch

    if device == "cuda":
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                step()
            finally:
                torch.cuda.set_sync_debug_mode("default")
        syncs = [w for w in caught if "synchroniz" in str(w.message)]
        return len(syncs), sorted({f"{'/'.join(Path(w.filename).parts[-3:])}:{w.lineno}" for w in syncs})
    from test_gpu_readiness import SyncCounter

    with SyncCounter() as counter:
        step()
    return len(counter.seen), sorted(set(map(str, counter.seen)))


def step_job(preset: str, batch_size: int, backend: str, compiled: bool, plan: dict, device: str) -> dict:
    import torch
    from torch._dynamo.utils import counters

    from convnextv2_hf import ConvNextV2ForMaskedImageModeling

    torch.manual_seed(0)
    model = ConvNextV2ForMaskedImageModeling(model_config(preset, sparse_backend=backend)).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device == "cuda")
    forward = torch.compile(model, backend=plan["compile"], mode=plan.get("mode"), fullgraph=True,
                            dynamic=False) if compiled else model
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
    skips_before = counters["inductor"]["cudagraph_skips"]
    start = time.perf_counter()
    step()  # the first step compiles
    synchronise(device)
    first_step_s = time.perf_counter() - start
    seconds = median_seconds(step, device, plan["warmup"], plan["repeats"])
    peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else float("nan")
    # CUDA counts the whole step (fused AdamW never syncs); on the CPU forward and backward, since the CPU AdamW's
    # step counters are read on the host by design, and a dispatch mode stops dynamo
    syncs, sites = (count_syncs(step, device) if device == "cuda" else (None, []) if compiled
                    else count_syncs(forward_backward, device))
    # inductor leaves CUDA graphs out of a graph it cannot capture without a word: the count says whether it did
    skipped = counters["inductor"]["cudagraph_skips"] - skips_before if compiled and plan.get("mode") else None
    return {"images_per_s": batch_size / seconds, "peak_gib": peak, "syncs": syncs, "sync_sites": sites,
            "first_step_s": first_step_s, "cudagraph_skips": skipped}


def run_steps(rows: list[tuple], plan: dict, device: str, budget_s: float) -> dict:
    """Each training-step configuration in turn, eager ones first; one that fails is recorded with its error, and
    one that would end past `budget_s` (if it takes as long as the longest so far: compiling is what takes the
    time) is recorded as not run."""
    import torch
    from tqdm.auto import tqdm

    presets = sorted({row[0] for row in rows}, key=[row[0] for row in rows].index)
    # eager first (quick), then the compiled ones with the largest model first: the goals are about base
    order = sorted(rows, key=lambda row: (row[3], -presets.index(row[0]) if row[3] else 0, row[2] != "gather", -row[1]))
    start, longest, results = time.perf_counter(), 0.0, {}
    for row in tqdm(order, desc="GPU section: training steps"):
        began = time.perf_counter()
        if began - start + longest > budget_s:
            results[row] = {"error": f"not run: it would end past --gpu_time_budget {budget_s:.0f} s"}
            continue
        try:
            results[row] = step_job(*row, plan, device)
        except Exception as error:  # noqa: BLE001 - one configuration's failure (say, out of memory) is a result
            results[row] = {"error": f"{type(error).__name__}: {str(error).splitlines()[0][:160] if str(error) else ''}"}
        tqdm.write(f"{row}: {results[row]}")  # as it goes, for a run cut short
        longest = max(longest, time.perf_counter() - began)
        torch._dynamo.reset()
        if device == "cuda":
            torch.cuda.empty_cache()
    return results


def ema_job(preset: str, plan: dict, device: str) -> dict:
    """Milliseconds of one EMA update of a classifier on `device` (the fine-tuning `--model_ema`): ours and torch's
    `AveragedModel` (what release 0.2.0 used)."""
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    from convnextv2_hf import ConvNextV2ForImageClassification
    from convnextv2_hf.training.loops.ema import ModelEMA

    model = ConvNextV2ForImageClassification(model_config(preset, num_labels=1000)).to(device)
    ours = ModelEMA(model, 0.9999)
    theirs = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.9999), use_buffers=True)
    return {"convnextv2-hf": 1000 * median_seconds(lambda: ours.update(model), device, plan["warmup"], plan["repeats"]),
            "AveragedModel": 1000 * median_seconds(lambda: theirs.update_parameters(model), device, plan["warmup"],
                                                   plan["repeats"])}


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


def step_cells(result: dict, key: str, form: str) -> str:
    if "error" in result:
        return "-"
    value = result[key]
    return "-" if value is None or value != value else form.format(value)


def step_table(steps: dict, plan: dict) -> list[str]:
    lines = ["| model, batch | backend | eager img/s | compiled img/s | gather / dense (eager, compiled) | peak GiB eager "
             "/ compiled | syncs per step eager / compiled | first step s (compiled) |", "|---|---|---|---|---|---|---|---|"]
    for preset in plan["presets"]:
        for batch in plan["batches"]:
            for backend in ("dense", "gather"):
                eager, compiled = steps[(preset, batch, backend, False)], steps[(preset, batch, backend, True)]
                ratios = []
                for mine, dense in ((eager, steps[(preset, batch, "dense", False)]),
                                    (compiled, steps[(preset, batch, "dense", True)])):
                    ok = "error" not in mine and "error" not in dense
                    ratios.append(f"{mine['images_per_s'] / dense['images_per_s']:.2f}x" if ok else "-")
                cells = [" / ".join(step_cells(r, key, form) for r in (eager, compiled))
                         for key, form in (("peak_gib", "{:.1f}"), ("syncs", "{}"))]
                lines.append(f"| {preset} {batch} | {backend} | {step_cells(eager, 'images_per_s', '{:.0f}')} | "
                             f"{step_cells(compiled, 'images_per_s', '{:.0f}')} | {', '.join(ratios)} | {cells[0]} | "
                             f"{cells[1]} | {step_cells(compiled, 'first_step_s', '{:.0f}')} |")
    notes = [f"- {row[0]} {row[1]} {row[2]} {'compiled' if row[3] else 'eager'}: {result['error']}"
             for row, result in steps.items() if "error" in result]
    notes += [f"- {row[0]} {row[1]} {row[2]} {'compiled' if row[3] else 'eager'}: syncs at {', '.join(result['sync_sites'])}"
              for row, result in steps.items() if result.get("sync_sites")]
    notes += [f"- {row[0]} {row[1]} {row[2]} compiled: CUDA graphs left out of {result['cudagraph_skips']} graph(s)"
              for row, result in steps.items() if result.get("cudagraph_skips")]
    return lines + ([""] + notes if notes else [])


def gpu_section(args, common: dict) -> list[str]:
    """The section's markdown, for `benchmark.py --sections gpu` (`--quick`: tiny sizes on the CPU)."""
    plan = QUICK if args.quick else dict(FULL, presets=tuple(args.gpu_presets), batches=tuple(args.gpu_batches),
                                         mode=args.gpu_compile_mode)
    device = args.device if not args.quick else "cpu"
    rows = [(p, b, backend, compiled) for p in plan["presets"] for b in plan["batches"]
            for backend in ("dense", "gather") for compiled in (False, True)]
    steps = run_steps(rows, plan, device, args.gpu_time_budget)
    lines = ["## FCMAE training step on the GPU" + (" (--quick: tiny model on the CPU)" if args.quick else ""), "",
             f"bf16 autocast, {plan['image_size']} px, mask 0.6, {'fused ' if device == 'cuda' else ''}AdamW; median "
             f"of {plan['repeats']} steps after {plan['warmup']} warm-up; compiled: {plan['compile']} "
             f"(mode {plan.get('mode') or 'default'}), fullgraph, static shapes.", "", *step_table(steps, plan)]
    preset = plan["presets"][-1]
    ema_ms = ema_job(preset, plan, device)
    copies = copy_job(plan["batches"][-1], plan, device)
    inference = inference_job(preset, plan["batches"][-1], plan, device)
    lines += ["", f"EMA update ({preset} classifier, on the model's device), ms per step: " +
              ", ".join(f"{name} {ms:.2f}" for name, ms in ema_ms.items()) + "."]
    if copies:
        lines.append(f"Host-to-device copy of {plan['batches'][-1]} images (pinned): " +
                     ", ".join(f"{dtype} {ms:.2f} ms" for dtype, ms in copies.items()) + ".")
    lines.append(f"Inference ({preset}, batch {plan['batches'][-1]}, bf16), images/s: " +
                 ", ".join(f"{name} {rate:.0f}" for name, rate in inference.items()) + ".")
    return lines + [""]
