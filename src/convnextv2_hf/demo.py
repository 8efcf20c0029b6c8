"""`convnextv2-hf demo`: what FCMAE buys, on real images, offline, in minutes on a CPU.

1. Pre-train a small ConvNeXt V2 with FCMAE on all training images, without labels (`convnextv2_hf.pretrain`).
2. Fine-tune on a few labelled images per class, (a) from the FCMAE weights and (b) from scratch, same recipe and
   budget, over several seeds (`convnextv2_hf.finetune`); report held-out top-1 as mean +- std.
3. Feature-collapse analysis of the pre-trained encoder (and, with --ablate_grn, of one pre-trained without GRN).

Default data: scikit-learn's handwritten digits (1,797 real 8x8 scans, shipped inside the package), or
`--train_dir` for your own folder of class sub-folders. Everything lands in `--output_dir`.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import time
from pathlib import Path

import numpy as np
import torch

# A 3-stage ConvNeXt V2 for small images: 2 px stem, 8 px mask cell -> a 4 x 4 mask grid at 32 px.
DEMO_MODEL = "num_stages=3,depths=[2,2,2],hidden_sizes=[32,64,128],patch_size=2,decoder_hidden_size=64,decoder_depth=1"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="convnextv2-hf demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output_dir", default="convnextv2-demo")
    p.add_argument("--quick", action="store_true", help="a smoke run in about a minute (numbers not meaningful)")
    p.add_argument("--train_dir", help="your own images, one sub-folder per class, instead of the digits")
    p.add_argument("--image_size", type=int, default=32, help="a multiple of 8 (the demo model's mask cell)")
    p.add_argument("--labels_per_class", type=int, default=10)
    p.add_argument("--test_fraction", type=float, default=0.3)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--pretrain_steps", type=int, default=1500)
    p.add_argument("--finetune_epochs", type=int, default=60)
    p.add_argument("--ablate_grn", action="store_true", help="also pre-train without GRN and compare feature collapse")
    p.add_argument("--compare_mixmae", action="store_true",
                   help="also pre-train with MixMAE for the same wall-clock time and fine-tune from it")
    p.add_argument("--model_config", default=DEMO_MODEL, help="config overrides for the demo model")
    return p


# --------------------------------------------------------------------------------------------- data


def write_digits(root: Path, image_size: int) -> list[tuple[Path, int]]:
    """scikit-learn's digits as PNG files (upscaled to `image_size`), one folder per digit."""
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    files = []
    for i, (pixels, label) in enumerate(zip(digits.images, digits.target)):
        folder = root / str(label)
        folder.mkdir(parents=True, exist_ok=True)
        image = Image.fromarray((pixels * (255 / 16)).astype(np.uint8), mode="L")
        path = folder / f"{i:04d}.png"
        image.resize((image_size, image_size), Image.BICUBIC).save(path)
        files.append((path, int(label)))
    return files


def list_folder(root: Path) -> tuple[list[tuple[Path, int]], list[str]]:
    """(file, class index) pairs of a folder with one sub-folder per class, and the class names."""
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if len(classes) < 2:
        raise ValueError(f"{root} needs at least two class sub-folders, found {classes}.")
    files = [(path, c) for c, name in enumerate(classes) for path in sorted((root / name).iterdir()) if path.is_file()]
    return files, classes


def split_files(files, class_names, out: Path, test_fraction: float, labels_per_class: int, seed: int = 0):
    """Copy files into train/ (all, for pre-training), labelled/ (a few per class) and test/ (held out)."""
    rng = random.Random(seed)
    by_class: dict[int, list[Path]] = {}
    for path, label in files:
        by_class.setdefault(label, []).append(path)
    counts = {"train": 0, "labelled": 0, "test": 0}
    for label, paths in sorted(by_class.items()):
        rng.shuffle(paths)
        n_test = max(1, int(round(len(paths) * test_fraction)))
        test, train = paths[:n_test], paths[n_test:]
        if len(train) < labels_per_class:
            raise ValueError(f"Class {class_names[label]!r} has only {len(train)} training images.")
        for split, chosen in (("test", test), ("train", train), ("labelled", train[:labels_per_class])):
            folder = out / split / class_names[label]
            folder.mkdir(parents=True, exist_ok=True)
            for path in chosen:
                shutil.copy(path, folder / f"{path.parent.name}_{path.name}")
            counts[split] += len(chosen)
    return counts


# --------------------------------------------------------------------------------------------- runs


def pretrain_run(data: Path, output: Path, args, seed: int, extra: str = "", steps: int | None = None,
                 strategy: str = "fcmae") -> dict:
    from .training.arguments import DataArguments, ModelArguments, PretrainingArguments
    from .training.pretrain import run as pretrain

    steps = steps or args.pretrain_steps
    return pretrain(
        ModelArguments(config_overrides=args.model_config + extra, image_size=args.image_size),
        DataArguments(train_dir=str(data / "train"), skip_corrupt_images=True),
        PretrainingArguments(
            output_dir=str(output), overwrite_output_dir=True, mask_strategy=strategy, sparse_grn_scope="sample",
            hub_model_id=f"convnextv2-demo-{output.name}", per_device_train_batch_size=64, max_train_steps=steps,
            num_warmup_steps=max(1, steps // 10), base_learning_rate=1.5e-3, crop_min_scale=0.5, seed=seed),
    )


def finetune_run(data: Path, output: Path, args, seed: int, start: str | None, labelled: int) -> dict:
    from transformers import TrainingArguments

    from .training.arguments import DataArguments, FinetuningArguments, ModelArguments
    from .training.finetune import run as finetune

    every = 5 * -(-labelled // 32)  # evaluate every 5 epochs
    training = TrainingArguments(
        output_dir=str(output), num_train_epochs=args.finetune_epochs, per_device_train_batch_size=32,
        per_device_eval_batch_size=256, learning_rate=2e-3, weight_decay=0.05, warmup_steps=0.1,
        lr_scheduler_type="cosine", label_smoothing_factor=0.1, eval_strategy="steps", eval_steps=every,
        logging_strategy="steps", logging_steps=every, save_strategy="no", report_to="none", seed=seed,
        data_seed=seed, disable_tqdm=True,
        hub_model_id="convnextv2-demo-finetuned" if output.name == "fcmae-seed0" else f"convnextv2-demo-{output.name}",
    )
    # No layer-wise decay: on this small model it cost 3-4 points (tried 0.65 and 0.8), see the README.
    model = (ModelArguments(config_overrides=args.model_config, image_size=args.image_size) if start is None
             else ModelArguments(model_name_or_path=start, image_size=args.image_size))
    return finetune(model, DataArguments(train_dir=str(data / "labelled"), validation_dir=str(data / "test"),
                                         skip_corrupt_images=True),
                    FinetuningArguments(drop_path_rate=0.1, crop_min_scale=0.5), training)


def eval_curve(run_dir: Path) -> tuple[list[float], list[float]]:
    history = json.loads((run_dir / "log_history.json").read_text())
    points = [(h["epoch"], h["eval_top1_accuracy"]) for h in history if "eval_top1_accuracy" in h]
    return [p[0] for p in points], [p[1] for p in points]


def load_split(data: Path, split: str, processor, limit: int | None = None) -> tuple[torch.Tensor, np.ndarray]:
    """The (first `limit`) images of a split folder, preprocessed, and their class-folder names."""
    from PIL import Image

    paths = sorted(p for p in (data / split).rglob("*") if p.is_file())[:limit]
    pixels = processor([Image.open(p).convert("RGB") for p in paths], return_tensors="pt")["pixel_values"]
    return pixels, np.array([p.parent.name for p in paths])


def linear_probe(model, labelled, test) -> float:
    """Held-out accuracy of a logistic regression on the frozen, pooled last-stage features (labelled -> test)."""
    from sklearn.linear_model import LogisticRegression

    def features(pixels):
        with torch.no_grad():
            return model.convnextv2(pixels).last_hidden_state.mean((2, 3)).numpy()

    (train_pixels, train_y), (test_pixels, test_y) = labelled, test
    train_x, test_x = features(train_pixels), features(test_pixels)
    mean, std = train_x.mean(0), train_x.std(0) + 1e-6
    probe = LogisticRegression(max_iter=5000).fit((train_x - mean) / std, train_y)
    return float(probe.score((test_x - mean) / std, test_y))


def result_row(label: str, values: list[float]) -> str:
    mean, std = mean_std(values)
    return f"| {label} | {100 * mean:.1f} +- {100 * std:.1f} % | " + ", ".join(f"{100 * v:.1f}" for v in values) + " |"


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


# --------------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    if args.quick:
        args.seeds, args.pretrain_steps, args.finetune_epochs = 2, 40, 4
    if args.image_size % 8:
        raise ValueError("--image_size must be a multiple of 8 (the demo model's mask cell).")
    from . import ConvNextV2ForMaskedImageModeling, ConvNextV2ImageProcessor
    from .analysis import feature_collapse
    from .training.reporting import save_curves

    out = Path(args.output_dir)
    data = out / "data"
    if data.exists():
        shutil.rmtree(data)
    started = time.time()
    if args.train_dir:
        files, class_names = list_folder(Path(args.train_dir))
        source = f"images from `{args.train_dir}`"
    else:
        raw = data / "raw"
        files = write_digits(raw, args.image_size)
        class_names = [str(i) for i in range(10)]
        source = "scikit-learn's handwritten digits (UCI optical digits, 8x8 scans, upscaled)"
    counts = split_files(files, class_names, data, args.test_fraction, args.labels_per_class)
    shutil.rmtree(data / "raw", ignore_errors=True)
    print(f"data: {counts['train']} unlabelled training images, {counts['labelled']} labelled "
          f"({args.labels_per_class} per class), {counts['test']} held-out test images")

    print(f"[1/3] FCMAE pre-training for {args.pretrain_steps} steps")
    t0 = time.time()
    pretrain_summary = pretrain_run(data, out / "fcmae", args, seed=0)
    pretrain_seconds = time.time() - t0

    print(f"[2/3] fine-tuning on {counts['labelled']} labelled images, {args.seeds} seeds x (FCMAE, scratch)")
    results: dict[str, list[float]] = {}
    curves: dict[str, list] = {}

    def finetune_seed(name: str, start: str | None, seed: int) -> None:
        run_dir = out / "runs" / f"{name}-seed{seed}"
        metrics = finetune_run(data, run_dir, args, seed, start, counts["labelled"])
        results.setdefault(name, []).append(metrics["eval_top1_accuracy"])
        curves.setdefault(name, []).append(eval_curve(run_dir))
        print(f"  {name:7s} seed {seed}: top-1 {100 * metrics['eval_top1_accuracy']:.1f}%")

    for seed in range(args.seeds):
        for name, start in (("fcmae", str(out / "fcmae")), ("scratch", None)):
            finetune_seed(name, start, seed)
    mixmae_note = []
    if args.compare_mixmae:
        probe_steps = max(5, args.pretrain_steps // 50)
        t0 = time.time()
        pretrain_run(data, out / "mixmae-probe", args, seed=0, steps=probe_steps, strategy="mixmae")
        per_step = (time.time() - t0) / probe_steps
        steps = max(probe_steps, int(pretrain_seconds / per_step))
        print(f"  MixMAE: {per_step:.3f} s/step, {steps} steps for the same {pretrain_seconds / 60:.1f} min")
        shutil.rmtree(out / "mixmae-probe", ignore_errors=True)
        t0 = time.time()
        pretrain_run(data, out / "mixmae", args, seed=0, steps=steps, strategy="mixmae")
        mixmae_seconds = time.time() - t0
        for seed in range(args.seeds):
            finetune_seed("mixmae", str(out / "mixmae"), seed)
        mixmae_note = [f"MixMAE pre-training: {steps} steps in {mixmae_seconds / 60:.1f} min (FCMAE: "
                       f"{args.pretrain_steps} steps in {pretrain_seconds / 60:.1f} min), same model and recipe.", ""]

    final = out / "convnextv2-demo-finetuned"
    if final.exists():
        shutil.rmtree(final)
    shutil.copytree(out / "runs" / "fcmae-seed0", final)

    print("[3/3] linear probes and feature-collapse analysis")
    processor = ConvNextV2ImageProcessor.from_pretrained(out / "fcmae")
    pretrained = ConvNextV2ForMaskedImageModeling.from_pretrained(out / "fcmae").eval()
    torch.manual_seed(0)
    random_init = ConvNextV2ForMaskedImageModeling(pretrained.config).eval()
    labelled, test = load_split(data, "labelled", processor), load_split(data, "test", processor)
    probes = {"FCMAE pre-trained": linear_probe(pretrained, labelled, test),
              "random initialisation": linear_probe(random_init, labelled, test)}
    images = test[0][:256]
    collapse = {"FCMAE, with GRN": feature_collapse(pretrained, images)}
    if args.ablate_grn:
        print("  pre-training the same model without GRN for the comparison")
        pretrain_run(data, out / "fcmae-no-grn", args, seed=0, extra=",use_grn=false")
        collapse["FCMAE, without GRN"] = feature_collapse(
            ConvNextV2ForMaskedImageModeling.from_pretrained(out / "fcmae-no-grn"), images)

    # ---------------------------------------------------------------- pictures and report
    def averaged(runs):
        epochs = runs[0][0]
        values = np.array([r[1] for r in runs])
        return epochs, values.mean(0).tolist(), values.min(0).tolist(), values.max(0).tolist()

    lines, bands = {}, {}
    for name, label in (("fcmae", "from FCMAE"), ("scratch", "from scratch"), ("mixmae", "from MixMAE")):
        if name not in curves:
            continue
        epochs, mean, low, high = averaged(curves[name])
        lines[label], bands[label] = (epochs, mean), (low, high)
    save_curves(lines, str(out / "finetune_curves.png"), f"Held-out top-1 while fine-tuning ({args.seeds} seeds, "
                f"min-max shaded)", xlabel="epoch", ylabel="top-1 accuracy", bands=bands)
    blocks = list(next(iter(collapse.values())))
    save_curves({name: (list(range(1, len(blocks) + 1)), list(values.values())) for name, values in collapse.items()},
                str(out / "feature_collapse.png"), "Mean pairwise cosine distance of expanded features",
                xlabel="block", ylabel="cosine distance")
    for name in ("reconstructions.png", "loss_curve.png"):
        shutil.copy(out / "fcmae" / name, out / ("pretrain_" + name if name == "loss_curve.png" else name))

    gain = 100 * (mean_std(results["fcmae"])[0] - mean_std(results["scratch"])[0])
    report = [
        "# ConvNeXt V2 + FCMAE demo", "",
        f"Data: {source}. {counts['train']} training images for label-free pre-training, "
        f"{counts['labelled']} of them labelled ({args.labels_per_class} per class) for fine-tuning, "
        f"{counts['test']} held-out test images.", "",
        f"Model: ConvNeXt V2 `{args.model_config}`, {args.image_size} px; FCMAE pre-training {args.pretrain_steps} "
        f"steps ({pretrain_seconds / 60:.1f} min, final loss {pretrain_summary['final_loss']:.4f}); fine-tuning "
        f"{args.finetune_epochs} epochs, identical recipe and budget for both starts.", "",
        "| start | held-out top-1 (mean +- std) | per seed |", "|---|---|---|",
        result_row("(a) FCMAE pre-trained", results["fcmae"]),
        result_row("(b) from scratch", results["scratch"]),
    ]
    if "mixmae" in results:
        report.append(result_row("(c) MixMAE pre-trained, same pre-training time", results["mixmae"]))
    report += [
        "",
        f"FCMAE pre-training changes top-1 by **{gain:+.1f} points** over training from scratch ({args.seeds} seeds).", "",
        "Linear probe (logistic regression on frozen, pooled last-stage features; labelled -> held-out): "
        + ", ".join(f"{name} {100 * value:.1f} %" for name, value in probes.items()) + ".", "",
        *mixmae_note,
        "## Feature collapse (mean pairwise cosine distance of the 4C-wide features, per block; higher = more diverse)",
        "", "| block | " + " | ".join(collapse) + " |", "|---" * (len(collapse) + 1) + "|",
    ]
    for block in blocks:
        report.append(f"| {block} | " + " | ".join(f"{values[block]:.3f}" for values in collapse.values()) + " |")
    report += [
        "", "## Pictures", "", "![reconstructions](reconstructions.png)", "", "![pre-training loss](pretrain_loss_curve.png)",
        "", "![fine-tuning](finetune_curves.png)", "", "![feature collapse](feature_collapse.png)", "",
        f"Checkpoints: `fcmae/` (pre-trained, with decoder) and `convnextv2-demo-finetuned/` (fine-tuned from FCMAE, "
        f"seed 0); each has its model card. Total time {(time.time() - started) / 60:.1f} min.",
    ]
    (out / "results.md").write_text("\n".join(report) + "\n")
    summary = {"fcmae_top1": results["fcmae"], "scratch_top1": results["scratch"], "gain_points": gain,
               "linear_probe": probes, "mixmae_top1": results.get("mixmae"),
               "collapse": collapse, "pretrain_final_loss": pretrain_summary["final_loss"],
               "minutes": (time.time() - started) / 60}
    (out / "results.json").write_text(json.dumps(summary, indent=2))
    print("\n".join(report[:14]))
    print(f"\nresults: {out / 'results.md'}")
    return summary
