"""The demo's report: the label-efficiency table and plot first, then the fine-tuning budget, feature collapse,
pictures; `results.md` for people and `results.json` for programs."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..training.plots import save_curves
from .runs import Budget

STARTS = ("fcmae", "scratch")
PROBES = ("linear FCMAE", "linear random", "knn FCMAE", "knn random")
LINE_LABELS = {"fcmae": "fine-tuned from FCMAE", "scratch": "fine-tuned from scratch",
               "linear FCMAE": "linear probe, FCMAE features", "linear random": "linear probe, random features",
               "knn FCMAE": "k-NN probe, FCMAE features", "knn random": "k-NN probe, random features"}


@dataclass
class SweepPoint:
    """One labelled-set size: held-out top-1 per seed for each start and probe, and what its runs cost."""

    labels: int | None  # per class; None = every training image
    per_class: float
    budget: Budget
    top1: dict[str, list[float]] = field(default_factory=dict)
    minutes: float = 0.0

    @property
    def name(self) -> str:
        return str(self.labels) if self.labels is not None else f"all ({self.per_class:.0f})"

    def add(self, key: str, value: float) -> None:
        self.top1.setdefault(key, []).append(value)

    def mean(self, key: str) -> float:
        return float(np.mean(self.top1[key]))


def cell(values: list[float]) -> str:
    """`mean [min-max]` in percent."""
    values = 100 * np.asarray(values)
    return f"{values.mean():.1f} [{values.min():.1f}-{values.max():.1f}]" if len(values) > 1 else f"{values[0]:.1f}"


def stops_being_ahead(points: list[SweepPoint]) -> str:
    """Where the fine-tuned FCMAE start is no longer ahead of the scratch start (by the mean over seeds), whether any
    gap exceeds the seed-to-seed spread, and what the probes say."""
    ahead = [p.mean("fcmae") > p.mean("scratch") for p in points]
    if all(ahead):
        where = "By the mean over seeds, the fine-tuned FCMAE start is ahead at every labelled-set size measured."
    elif not any(ahead):
        where = "By the mean over seeds, the fine-tuned FCMAE start is not ahead at any labelled-set size measured."
    else:
        first = next(p for p, a in zip(points, ahead) if not a)
        again = [p.name for p, a in zip(points, ahead) if a and p.per_class > first.per_class]
        where = (f"By the mean over seeds, the fine-tuned FCMAE start stops being ahead at **{first.name} labels per "
                 f"class**" + (f" (and is ahead again at {', '.join(again)})." if again else "."))
    clear = [p.name for p in points if min(p.top1["fcmae"]) > max(p.top1["scratch"])]
    behind = [p.name for p in points if max(p.top1["fcmae"]) < min(p.top1["scratch"])]
    spread = ("Its gap exceeds the seed-to-seed spread (no overlap of the min-max ranges) at "
              f"{', '.join(clear) if clear else 'no size'}" + (f" and it is clearly behind at {', '.join(behind)}."
                                                                  if behind else "."))
    probes = [p.name for p in points if p.mean("linear FCMAE") > p.mean("linear random")]
    return f"{where} {spread} The linear probe on frozen features favours FCMAE at {len(probes)} of {len(points)} sizes."


def sweep_table(points: list[SweepPoint], seeds: int) -> list[str]:
    lines = ["| labels per class | fine-tuned from FCMAE | from scratch | FCMAE - scratch (points) | linear probe "
             "FCMAE / random | k-NN probe FCMAE / random | budget per run | minutes for the row |",
             "|---|---|---|---|---|---|---|---|"]
    for p in points:
        gain = 100 * (p.mean("fcmae") - p.mean("scratch"))
        lines.append(
            f"| {p.name} | {cell(p.top1['fcmae'])} | {cell(p.top1['scratch'])} | {gain:+.1f} | "
            f"{cell(p.top1['linear FCMAE'])} / {cell(p.top1['linear random'])} | {cell(p.top1['knn FCMAE'])} / "
            f"{cell(p.top1['knn random'])} | {p.budget.epochs} epochs, {p.budget.steps} steps of {p.budget.batch_size} "
            f"| {p.minutes:.1f} |")
    return lines + ["", f"Held-out top-1 in %, mean over {seeds} seed(s) [min-max]; each seed draws its own labelled "
                    "images. Probes: frozen, pooled last-stage features; k-NN with k = min(10, labelled images), "
                    "cosine distance, distance-weighted votes. Minutes: fine-tuning runs of the row (both starts, "
                    "all seeds); probes take seconds."]


def save_sweep_plot(points: list[SweepPoint], path: Path, seeds: int) -> None:
    xs = [p.per_class for p in points]
    curves, bands = {}, {}
    for key in STARTS + PROBES:
        values = np.array([p.top1[key] for p in points])
        curves[LINE_LABELS[key]] = (xs, values.mean(1).tolist())
        bands[LINE_LABELS[key]] = (values.min(1).tolist(), values.max(1).tolist())
    save_curves(curves, str(path), f"Held-out top-1 vs labels per class ({seeds} seed(s), min-max shaded)",
                xlabel="labelled images per class (log scale)", ylabel="top-1 accuracy", bands=bands, logx=True,
                tick_labels={p.per_class: p.name for p in points})


def budget_table(curves: dict[str, list], budget_epochs: int, full_epochs: int, labels: int) -> list[str]:
    """Top-1 after a small fixed budget next to the full budget, read off each run's evaluations."""
    lines = [f"| start ({labels} labels per class) | top-1 after {budget_epochs} epochs | after the full {full_epochs} |",
             "|---|---|---|"]
    for start, runs in curves.items():
        early = [acc[min(range(len(ep)), key=lambda i: abs(ep[i] - budget_epochs))] for ep, acc in runs]
        lines.append(f"| {LINE_LABELS[start]} | {cell(early)} | {cell([acc[-1] for _, acc in runs])} |")
    return lines


def save_learning_curves(curves: dict[str, list], path: Path, seeds: int) -> None:
    lines, bands = {}, {}
    for start, runs in curves.items():
        values = np.array([acc for _, acc in runs])
        lines[LINE_LABELS[start]] = (runs[0][0], values.mean(0).tolist())
        bands[LINE_LABELS[start]] = (values.min(0).tolist(), values.max(0).tolist())
    save_curves(lines, str(path), f"Held-out top-1 while fine-tuning ({seeds} seed(s), min-max shaded)",
                xlabel="epoch", ylabel="top-1 accuracy", bands=bands)


def write_json(path: Path, summary: dict) -> None:
    path.write_text(json.dumps(summary, indent=2))


def write_report(out: Path, args, data, pretraining, sweep, curves, mixmae, collapse, started: float) -> dict:
    """Pictures, `results.md` (leading with the label-efficiency table) and `results.json`; returns the summary."""
    save_sweep_plot(sweep, out / "label_efficiency.png", args.seeds)
    save_learning_curves(curves, out / "finetune_curves.png", args.seeds)
    blocks = list(next(iter(collapse.values())))
    save_curves({name: (list(range(1, len(blocks) + 1)), list(values.values())) for name, values in collapse.items()},
                str(out / "feature_collapse.png"), "Mean pairwise cosine distance of expanded features",
                xlabel="block", ylabel="cosine distance (0: collapsed)", ylim=(0, 1))
    full_epochs = next(p.budget.epochs for p in sweep if p.labels == args.curve_labels)
    minutes = (time.time() - started) / 60
    lines = report_lines(args, data, pretraining, sweep, curves, mixmae, collapse, full_epochs, minutes)
    (out / "results.md").write_text("\n".join(lines) + "\n")
    summary = {
        "label_sweep": {p.name: {"labels_per_class": p.per_class, "top1": p.top1, "epochs": p.budget.epochs,
                                 "steps": p.budget.steps, "batch_size": p.budget.batch_size, "minutes": p.minutes}
                        for p in sweep},
        "stops_being_ahead": stops_being_ahead(sweep),
        "budget": {start: {"epochs": [ep for ep, _ in runs], "top1": [acc for _, acc in runs]}
                   for start, runs in curves.items()},
        "mixmae": mixmae, "collapse": collapse, "pretrain_final_loss": pretraining["final_loss"],
        "pretrain_minutes": pretraining["minutes"], "minutes": minutes,
    }
    write_json(out / "results.json", summary)
    print("\n".join(lines[:len(sweep) + 9]))
    print(f"\nresults: {out / 'results.md'}")
    return summary


def report_lines(args, data, pretraining, sweep, curves, mixmae, collapse, full_epochs, minutes) -> list[str]:
    lines = [
        "# ConvNeXt V2 + FCMAE demo: how many labels does pre-training save?", "",
        f"Data: {data.source}; {data.num_train} training images for label-free pre-training, labelled subsets of "
        f"them for fine-tuning, held-out test images for every number below. Model: ConvNeXt V2 "
        f"`{args.model_config}`, {args.image_size} px; FCMAE pre-training {args.pretrain_steps} steps "
        f"({pretraining['minutes']:.1f} min, final loss {pretraining['final_loss']:.4f}).", "",
        "## Label efficiency", "", *sweep_table(sweep, args.seeds), "", stops_being_ahead(sweep), "",
        "![label efficiency](label_efficiency.png)", "",
        f"## Fine-tuning budget ({args.curve_labels} labels per class)", "",
        *budget_table(curves, args.budget_epochs, full_epochs, args.curve_labels), "",
        "![fine-tuning curves](finetune_curves.png)", "",
    ]
    if mixmae:
        lines += [f"MixMAE pre-training for the same time ({mixmae['steps']} steps, {mixmae['minutes']:.1f} min), "
                  f"fine-tuned at {args.curve_labels} labels per class: {cell(mixmae['top1'])} %.", ""]
    lines += ["## Feature collapse (mean pairwise cosine distance of the 4C-wide features, per block; higher = more "
              "diverse; 256 held-out images drawn evenly across classes)", "",
              "| block | " + " | ".join(collapse) + " |", "|---" * (len(collapse) + 1) + "|"]
    for block in next(iter(collapse.values())):
        lines.append(f"| {block} | " + " | ".join(f"{values[block]:.3f}" for values in collapse.values()) + " |")
    return lines + [
        "", "## Pictures", "", "![reconstructions](reconstructions.png)", "",
        "![pre-training loss](pretrain_loss_curve.png)", "", "![feature collapse](feature_collapse.png)", "",
        f"Checkpoints: `fcmae/` (pre-trained, with decoder) and `convnextv2-demo-finetuned/` (fine-tuned from FCMAE on "
        f"{args.curve_labels} labels per class, seed 0), each with its model card. Total time {minutes:.1f} min.",
    ]
