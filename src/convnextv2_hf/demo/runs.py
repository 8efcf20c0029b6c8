"""The demo's pre-training and fine-tuning runs: the example scripts' own entry points, given argument objects."""

from __future__ import annotations

import contextlib
import io
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

from transformers import TrainingArguments

from ..training.arguments import DataArguments, FinetuningArguments, ModelArguments, PretrainingArguments
from ..training.finetune import run as finetune
from ..training.pretrain import run as pretrain

# A 3-stage ConvNeXt V2 for small images: 2 px stem, 8 px mask cell -> a 4 x 4 mask grid at 32 px.
DEMO_MODEL = "num_stages=3,depths=[2,2,2],hidden_sizes=[32,64,128],patch_size=2,decoder_hidden_size=64,decoder_depth=1"


@dataclass(frozen=True)
class Budget:
    """How long one fine-tuning run trains. Small labelled sets get many epochs and large ones few, so that every run
    sees at least `passes` images and takes at least `min_steps` optimizer steps, within the epoch limits."""

    epochs: int
    batch_size: int
    steps_per_epoch: int

    @property
    def steps(self) -> int:
        return self.epochs * self.steps_per_epoch

    @classmethod
    def for_images(cls, images: int, passes: int, min_epochs: int, max_epochs: int, min_steps: int = 120) -> "Budget":
        batch = min(images, 32 if images < 250 else 64)
        steps_per_epoch = math.ceil(images / batch)
        wanted = max(math.ceil(passes / images), math.ceil(min_steps / steps_per_epoch))
        return cls(max(min_epochs, min(max_epochs, wanted)), batch, steps_per_epoch)


def finetune_budget(data, labels: int | None, args) -> Budget:
    """The fine-tuning budget for `labels` images per class (every training image for None)."""
    images = labels * len(data.class_names) if labels is not None else data.num_train
    return Budget.for_images(images, args.finetune_passes, args.min_finetune_epochs, args.max_finetune_epochs)


def pretrain_run(train_dir: Path, output: Path, args, seed: int, extra: str = "", steps: int | None = None,
                 strategy: str = "fcmae") -> dict:
    steps = steps or args.pretrain_steps
    return pretrain(
        ModelArguments(model_preset="atto", config_overrides=args.model_config + extra, image_size=args.image_size),
        DataArguments(train_dir=str(train_dir), skip_corrupt_images=True),
        PretrainingArguments(
            output_dir=str(output), overwrite_output_dir=True, mask_strategy=strategy, sparse_grn_scope="sample",
            hub_model_id=f"convnextv2-demo-{output.name}", per_device_train_batch_size=64, max_train_steps=steps,
            num_warmup_steps=max(1, steps // 10), base_learning_rate=1.5e-3, crop_min_scale=0.5, seed=seed,
            norm_pix_loss=False, checkpoints_total_limit=None),
    )


def finetune_run(labelled: Path, test: Path, output: Path, args, seed: int, start: str | None, budget: Budget,
                 eval_every: int | None = None, name: str | None = None) -> tuple[dict, float]:
    """One fine-tuning run (FCMAE start, or scratch when `start` is None); returns its metrics and its minutes.
    With `eval_every`, the held-out set is also evaluated every that many epochs (for the learning curves)."""
    every = (eval_every or budget.epochs) * budget.steps_per_epoch
    training = TrainingArguments(
        output_dir=str(output), num_train_epochs=budget.epochs, per_device_train_batch_size=budget.batch_size,
        per_device_eval_batch_size=256, learning_rate=2e-3, weight_decay=0.05, warmup_steps=0.1,
        lr_scheduler_type="cosine", label_smoothing_factor=0.1, eval_strategy="steps" if eval_every else "no",
        eval_steps=every, logging_strategy="steps", logging_steps=every, save_strategy="no", report_to="none",
        seed=seed, data_seed=seed, disable_tqdm=True, hub_model_id=name or f"convnextv2-demo-{output.name}",
    )
    # No layer-wise decay: on this small model it cost 3-4 points (tried 0.65 and 0.8), see the README.
    model = (ModelArguments(model_preset="atto", config_overrides=args.model_config, image_size=args.image_size)
             if start is None else ModelArguments(model_name_or_path=start, image_size=args.image_size))
    started = time.time()
    with contextlib.redirect_stdout(io.StringIO()):  # the Trainer prints every log line; the demo reports itself
        metrics = finetune(model, DataArguments(train_dir=str(labelled), validation_dir=str(test),
                                                skip_corrupt_images=True),
                           FinetuningArguments(drop_path_rate=0.1, crop_min_scale=0.5, overwrite_output_dir=True,
                                               warmup_epochs=0, aa="none", reprob=0.0, color_jitter=0.0), training)
    return metrics, (time.time() - started) / 60


def eval_curve(run_dir: Path) -> tuple[list[float], list[float]]:
    """(epochs, held-out top-1) of the evaluations a run logged."""
    history = json.loads((run_dir / "log_history.json").read_text())
    points = [(h["epoch"], h["eval_top1_accuracy"]) for h in history if "eval_top1_accuracy" in h]
    return [p[0] for p in points], [p[1] for p in points]
