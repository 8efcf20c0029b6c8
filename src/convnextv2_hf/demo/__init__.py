"""`convnextv2-hf demo`: how many labels does FCMAE pre-training save? Real images, offline, minutes on a CPU.

1. Pre-train a small ConvNeXt V2 with FCMAE on every training image, without labels.
2. Label-efficiency sweep: for 1, 2, 5, 10, 25 labelled images per class and all of them, fine-tune (a) from the
   FCMAE weights and (b) from scratch with the same recipe and budget, and probe the frozen features (linear and
   k-NN) of the FCMAE encoder and of a random one; several seeds, each drawing its own labelled images.
3. The fine-tuning budget (top-1 after a few epochs and after all of them), feature collapse, pictures and a report.

Default data: scikit-learn's handwritten digits (1,797 real 8x8 scans, shipped inside the package), or
`--train_dir` for your own folder of class sub-folders. It drives the example scripts' own entry points.
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

import torch

from ..outputs.manifest import record, remove_ours
from .data import files_under, labelled_folder, list_folder, prepare_data, stratified_sample, write_digits
from .probes import FrozenFeatures
from .report import SweepPoint, cell
from .runs import DEMO_MODEL, eval_curve, finetune_budget, finetune_run, pretrain_run

# Every top-level name the demo writes into --output_dir; only these (and only when it wrote them) are replaced.
DEMO_OUTPUTS = ("data", "runs", "fcmae", "fcmae-no-grn", "mixmae", "mixmae-probe", "convnextv2-demo-finetuned",
                "reconstructions.png", "pretrain_loss_curve.png", "label_efficiency.png", "finetune_curves.png",
                "feature_collapse.png", "results.md", "results.json")
QUICK = dict(seeds=1, pretrain_steps=40, label_counts="1,10", finetune_passes=60, max_finetune_epochs=3,
             min_finetune_epochs=2, budget_epochs=1, curve_every=1)


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The module docstring as written, and every option's default."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="convnextv2-hf demo", description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--output_dir", default="convnextv2-demo",
                   help="where the data, runs, pictures and results.md go, in the current folder")
    p.add_argument("--overwrite_output_dir", action="store_true", help="replace an earlier demo in --output_dir")
    p.add_argument("--quick", action="store_true", help="a smoke run in about a minute (numbers not meaningful)")
    p.add_argument("--train_dir", help="your own images, one sub-folder per class, instead of the digits")
    p.add_argument("--image_size", type=int, default=32, help="a multiple of 8 (the demo model's mask cell)")
    p.add_argument("--label_counts", default="1,2,5,10,25,all", help="labelled images per class to sweep")
    p.add_argument("--curve_labels", type=int, default=10, help="the labels per class whose runs log learning curves")
    p.add_argument("--test_fraction", type=float, default=0.3, help="images per class held out for evaluation")
    p.add_argument("--seeds", type=int, default=3, help="fine-tuning runs per label count")
    p.add_argument("--pretrain_steps", type=int, default=1500, help="FCMAE pre-training steps")
    p.add_argument("--finetune_passes", type=int, default=3000, help="image passes per fine-tuning run (budget)")
    p.add_argument("--min_finetune_epochs", type=int, default=8, help="fewest epochs of a fine-tuning run")
    p.add_argument("--max_finetune_epochs", type=int, default=100, help="most epochs of a fine-tuning run")
    p.add_argument("--budget_epochs", type=int, default=15, help="the small fine-tuning budget reported")
    p.add_argument("--curve_every", type=int, default=5, help="epochs between evaluations on the curve runs")
    p.add_argument("--ablate_grn", action="store_true", help="also pre-train without GRN and compare feature collapse")
    p.add_argument("--compare_mixmae", action="store_true",
                   help="also pre-train with MixMAE for the same wall-clock time and fine-tune from it")
    p.add_argument("--model_config", default=DEMO_MODEL, help="config overrides for the demo model")
    return p


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    args = build_parser().parse_args(argv)
    if args.quick:
        vars(args).update(QUICK)
    if args.image_size % 8:
        raise ValueError(f"--image_size {args.image_size} must be a multiple of 8 (the demo model's mask cell).")
    args.label_counts = [None if c.strip() == "all" else int(c) for c in args.label_counts.split(",")]
    if args.curve_labels not in args.label_counts:
        args.curve_labels = next(c for c in args.label_counts if c is not None)
    return args


def main(argv: list[str] | None = None) -> dict:
    """Run the demo; returns the summary also written to `results.json`."""
    from ..outputs.output_dir import OutputDirLock, check_output_dir

    import datasets

    args, started = parse_args(argv), time.time()
    datasets.disable_progress_bars()  # dozens of small loads; the demo prints its own progress
    out = Path(args.output_dir)
    check_output_dir(out, "--output_dir", overwrite=args.overwrite_output_dir, writes=DEMO_OUTPUTS, resumable=False)
    refuse_train_dir_inside(args.train_dir, out)
    with OutputDirLock(out):
        record(out, *DEMO_OUTPUTS)
        for stale in ("data", "runs"):
            remove_ours(out / stale)
        data = data_section(out, args)
        pretraining = pretraining_section(data, out, args)
        sweep, curves = label_sweep_section(data, out, args)
        mixmae = mixmae_section(data, out, args, pretraining["minutes"]) if args.compare_mixmae else None
        collapse = collapse_section(data, out, args)
        return report_section(out, args, data, pretraining, sweep, curves, mixmae, collapse, started)


def refuse_train_dir_inside(train_dir: str | None, out: Path) -> None:
    """The demo rewrites its own outputs; images kept inside them would be deleted."""
    if train_dir is None:
        return
    images = Path(train_dir).resolve()
    for name in DEMO_OUTPUTS:
        if images == (out / name).resolve() or (out / name).resolve() in images.parents:
            raise ValueError(f"--train_dir {train_dir!r} lies inside the demo's own output {str(out / name)!r}, which "
                             "the demo replaces; copy the images elsewhere or choose another --output_dir.")


def data_section(out: Path, args):
    if args.train_dir:
        files, class_names = list_folder(Path(args.train_dir))
        source = f"images from `{args.train_dir}`"
    else:
        files = write_digits(out / "data" / "raw", args.image_size)
        class_names = [str(i) for i in range(10)]
        source = "scikit-learn's handwritten digits (UCI optical digits, 8x8 scans, upscaled)"
    data = prepare_data(out / "data", files, class_names, args.test_fraction, source)
    shutil.rmtree(out / "data" / "raw", ignore_errors=True)
    test = len(files_under(data.test_dir))
    print(f"data: {data.num_train} training images ({len(class_names)} classes), {test} held-out test images")
    return data


def pretraining_section(data, out: Path, args) -> dict:
    print(f"[1/4] FCMAE pre-training for {args.pretrain_steps} steps, no labels")
    started = time.time()
    summary = pretrain_run(data.train_dir, out / "fcmae", args, seed=0)
    for name in ("reconstructions.png", "loss_curve.png"):
        shutil.copy(out / "fcmae" / name, out / ("pretrain_" + name if name == "loss_curve.png" else name))
    return {"final_loss": summary["final_loss"], "minutes": (time.time() - started) / 60}


def encoders(out: Path):
    """The pre-trained FCMAE model, a randomly initialised twin, and the processor."""
    from .. import ConvNextV2ForMaskedImageModeling, ConvNextV2ImageProcessor

    pretrained = ConvNextV2ForMaskedImageModeling.from_pretrained(out / "fcmae").eval()
    torch.manual_seed(0)
    random_init = ConvNextV2ForMaskedImageModeling(pretrained.config).eval()
    return pretrained, random_init, ConvNextV2ImageProcessor.from_pretrained(out / "fcmae")


def label_sweep_section(data, out: Path, args):
    """Fine-tuning from FCMAE and from scratch, and probes, for every labelled-set size and seed."""
    pretrained, random_init, processor = encoders(out)
    train_files, test_files = files_under(data.train_dir), files_under(data.test_dir)
    features = {"FCMAE": FrozenFeatures(pretrained.convnextv2, processor, train_files, test_files),
                "random": FrozenFeatures(random_init.convnextv2, processor, train_files, test_files)}
    points, curves = [], {"fcmae": [], "scratch": []}
    print(f"[2/4] label sweep {[c or 'all' for c in args.label_counts]} x {args.seeds} seed(s) x (FCMAE, scratch)")
    for labels in args.label_counts:
        per_class = data.per_class(labels)
        budget = finetune_budget(data, labels, args)
        point = SweepPoint(labels, per_class, budget)
        for seed in range(args.seeds):
            sweep_seed(point, data, out, args, seed, features, curves if labels == args.curve_labels else None)
        print(f"  {point.name:>9} per class: FCMAE {cell(point.top1['fcmae'])}, scratch {cell(point.top1['scratch'])}"
              f" ({budget.epochs} epochs, {point.minutes:.1f} min)")
        points.append(point)
    return points, curves


def sweep_seed(point: SweepPoint, data, out: Path, args, seed: int, features: dict, curves: dict | None) -> None:
    folder = labelled_folder(data, point.labels, seed)
    for start, source in (("fcmae", str(out / "fcmae")), ("scratch", None)):
        run_dir = out / "runs" / f"{start}-{point.labels or 'all'}-per-class-seed{seed}"
        keep = curves is not None and seed == 0 and start == "fcmae"  # becomes the demo's published classifier
        metrics, minutes = finetune_run(folder, data.test_dir, run_dir, args, seed, source, point.budget,
                                        eval_every=args.curve_every if curves is not None else None,
                                        name="convnextv2-demo-finetuned" if keep else None)
        point.add(start, metrics["eval_top1_accuracy"])
        point.minutes += minutes
        if curves is not None:
            curves[start].append(eval_curve(run_dir))
    labelled = files_under(folder)
    for encoder, frozen in features.items():
        for probe, accuracy in frozen.probe(labelled).items():
            point.add(f"{probe} {encoder}", accuracy)


def mixmae_section(data, out: Path, args, fcmae_minutes: float) -> dict:
    """MixMAE pre-training for the same wall-clock time, fine-tuned at the curve label count."""
    probe_steps = max(5, args.pretrain_steps // 50)
    started = time.time()
    pretrain_run(data.train_dir, out / "mixmae-probe", args, seed=0, steps=probe_steps, strategy="mixmae")
    steps = max(probe_steps, int(fcmae_minutes * 60 / ((time.time() - started) / probe_steps)))
    remove_ours(out / "mixmae-probe")
    print(f"[+] MixMAE pre-training for {steps} steps (the FCMAE pre-training time)")
    started = time.time()
    pretrain_run(data.train_dir, out / "mixmae", args, seed=0, steps=steps, strategy="mixmae")
    minutes = (time.time() - started) / 60
    budget = finetune_budget(data, args.curve_labels, args)
    top1 = [finetune_run(labelled_folder(data, args.curve_labels, seed), data.test_dir,
                         out / "runs" / f"mixmae-{args.curve_labels}-per-class-seed{seed}", args, seed,
                         str(out / "mixmae"), budget)[0]["eval_top1_accuracy"] for seed in range(args.seeds)]
    return {"steps": steps, "minutes": minutes, "top1": top1}


def collapse_section(data, out: Path, args) -> dict:
    """Feature collapse on 256 held-out images drawn evenly across classes (and, with --ablate_grn, without GRN)."""
    from .. import ConvNextV2ForMaskedImageModeling
    from ..analysis import feature_collapse
    from ..training.data.decoding import decode_image

    print("[3/4] feature-collapse analysis")
    pretrained, _, processor = encoders(out)
    sample = stratified_sample(files_under(data.test_dir), 256)
    images = processor([decode_image({"path": str(p), "bytes": None}) for p in sample], return_tensors="pt")["pixel_values"]
    collapse = {"FCMAE, with GRN": feature_collapse(pretrained, images)}
    if args.ablate_grn:
        pretrain_run(data.train_dir, out / "fcmae-no-grn", args, seed=0, extra=",use_grn=false")
        no_grn = ConvNextV2ForMaskedImageModeling.from_pretrained(out / "fcmae-no-grn")
        collapse["FCMAE, without GRN"] = feature_collapse(no_grn, images)
    return collapse


def report_section(out: Path, args, data, pretraining, sweep, curves, mixmae, collapse, started: float) -> dict:
    from .report import write_report

    print("[4/4] report")
    final = out / "convnextv2-demo-finetuned"
    remove_ours(final)
    shutil.copytree(out / "runs" / f"fcmae-{args.curve_labels}-per-class-seed0", final)
    return write_report(out, args, data, pretraining, sweep, curves, mixmae, collapse, started)
