"""Fine-tuning ConvNeXt V2 image classifiers with the `Trainer`, on `datasets` pipelines.

The code behind `examples/classification/run_finetune.py` and the demo. Starts from an FCMAE checkpoint, a
transformers-format ConvNeXt V2 classifier or a preset from scratch; adds the reference fine-tuning recipe:
layer-wise learning-rate decay, a small re-initialised head, drop path, label smoothing, optional EMA and
mixup/cutmix. Top-1/top-5 accuracy come from the `evaluate` metric module shipped in the package.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from transformers import HfArgumentParser, Trainer, TrainerCallback, TrainingArguments

logger = logging.getLogger(__name__)


@dataclass
class ModelArguments:
    model_name_or_path: str | None = field(default=None, metadata={
        "help": "FCMAE checkpoint, ConvNeXt V2 classifier checkpoint (ours or transformers'), or none for --model_preset"})
    model_preset: str = field(default="atto", metadata={"help": "size when training from scratch: atto ... huge"})
    config_overrides: str | None = field(default=None, metadata={"help": 'e.g. "patch_size=2,depths=[1,1,3,1]"'})
    image_processor_name: str | None = None
    image_size: int = 224
    drop_path_rate: float = 0.1
    head_init_scale: float = field(default=0.001, metadata={"help": "a new head is initialised at std 0.02 x this"})
    layer_decay: float | None = field(default=None, metadata={"help": "layer-wise lr decay factor, e.g. 0.9"})
    layer_decay_type: str = field(default="single", metadata={"help": "single or group, as in the reference"})
    ignore_mismatched_sizes: bool = field(default=False, metadata={"help": "allow a checkpoint head of another size"})
    model_ema: bool = field(default=False, metadata={"help": "keep an exponential moving average of the weights"})
    model_ema_decay: float = 0.9999
    cache_dir: str | None = None


@dataclass
class DataArguments:
    dataset_name: str | None = None
    dataset_config_name: str | None = None
    train_dir: str | None = None
    validation_dir: str | None = None
    train_val_split: float = 0.15
    image_column_name: str | None = None
    label_column_name: str | None = None
    max_train_samples: int | None = None
    max_eval_samples: int | None = None
    skip_corrupt_images: bool = False
    crop_min_scale: float = field(default=0.08, metadata={"help": "RandomResizedCrop lower scale for training"})
    mixup: float = field(default=0.0, metadata={"help": "mixup alpha (0 = off); reference 0.8"})
    cutmix: float = field(default=0.0, metadata={"help": "cutmix alpha (0 = off); reference 1.0"})
    mixup_switch_prob: float = 0.5


# --------------------------------------------------------------------------------------------- data


class MixupCutmixCollator:
    """Batches with mixup or cutmix (one chosen per batch) and soft, optionally smoothed, labels."""

    def __init__(self, num_labels: int, mixup_alpha: float = 0.0, cutmix_alpha: float = 0.0, switch_prob: float = 0.5,
                 label_smoothing: float = 0.0):
        self.num_labels, self.mixup_alpha, self.cutmix_alpha = num_labels, mixup_alpha, cutmix_alpha
        self.switch_prob, self.label_smoothing = switch_prob, label_smoothing

    def soft_labels(self, labels: torch.Tensor) -> torch.Tensor:
        off = self.label_smoothing / self.num_labels
        return torch.full((len(labels), self.num_labels), off).scatter_(1, labels[:, None], 1 - self.label_smoothing + off)

    def __call__(self, examples):
        pixels = torch.stack([e["pixel_values"] for e in examples])
        labels = self.soft_labels(torch.tensor([e["labels"] for e in examples]))
        use_cutmix = self.cutmix_alpha > 0 and (self.mixup_alpha <= 0 or torch.rand(1).item() < self.switch_prob)
        alpha = self.cutmix_alpha if use_cutmix else self.mixup_alpha
        if alpha <= 0 or len(examples) < 2:
            return {"pixel_values": pixels, "labels": labels}
        lam = float(np.random.beta(alpha, alpha))
        flipped = pixels.flip(0)
        if use_cutmix:
            h, w = pixels.shape[-2:]
            cut_h, cut_w = int(h * (1 - lam) ** 0.5), int(w * (1 - lam) ** 0.5)
            cy, cx = np.random.randint(h), np.random.randint(w)
            y0, y1 = max(cy - cut_h // 2, 0), min(cy + cut_h // 2, h)
            x0, x1 = max(cx - cut_w // 2, 0), min(cx + cut_w // 2, w)
            pixels = pixels.clone()
            pixels[:, :, y0:y1, x0:x1] = flipped[:, :, y0:y1, x0:x1]
            lam = 1 - (y1 - y0) * (x1 - x0) / (h * w)
        else:
            pixels = lam * pixels + (1 - lam) * flipped
        return {"pixel_values": pixels, "labels": lam * labels + (1 - lam) * labels.flip(0)}


def collate(examples):
    return {"pixel_values": torch.stack([e["pixel_values"] for e in examples]),
            "labels": torch.tensor([e["labels"] for e in examples])}


def label_names(dataset, column: str) -> list[str]:
    feature = dataset.features[column]
    if hasattr(feature, "names"):
        return list(feature.names)
    return [str(v) for v in sorted(set(dataset[column]))]


# --------------------------------------------------------------------------------------------- model


def load_classifier(model_args: ModelArguments, labels: list[str]):
    """Classifier with `len(labels)` classes from an FCMAE or classifier checkpoint, or a new preset model."""
    from . import ConvNextV2Config, ConvNextV2ForImageClassification
    from .pretrain import parse_config_overrides

    id2label = dict(enumerate(labels))
    label_kwargs = dict(num_labels=len(labels), id2label=id2label, label2id={v: k for k, v in id2label.items()})
    overrides = parse_config_overrides(model_args.config_overrides)
    overrides["drop_path_rate"] = model_args.drop_path_rate
    if model_args.model_name_or_path is None:
        config = ConvNextV2Config.from_preset(model_args.model_preset, image_size=model_args.image_size, **overrides,
                                              **label_kwargs)
        return ConvNextV2ForImageClassification(config), True
    config = ConvNextV2Config.from_pretrained(model_args.model_name_or_path, cache_dir=model_args.cache_dir)
    from_fcmae = "ConvNextV2ForMaskedImageModeling" in (config.architectures or [])
    has_head = not from_fcmae and config.architectures and "ForImageClassification" in config.architectures[0]
    if has_head and config.num_labels != len(labels) and not model_args.ignore_mismatched_sizes:
        raise ValueError(
            f"{model_args.model_name_or_path} classifies {config.num_labels} classes but the dataset has {len(labels)}; "
            "pass --ignore_mismatched_sizes to train a new head."
        )
    same_head = has_head and config.num_labels == len(labels)
    for key, value in overrides.items():
        setattr(config, key, value)
    if not same_head:
        config.num_labels, config.id2label, config.label2id = (
            label_kwargs["num_labels"], label_kwargs["id2label"], label_kwargs["label2id"])
    model = ConvNextV2ForImageClassification.from_pretrained(
        model_args.model_name_or_path, config=config, ignore_mismatched_sizes=model_args.ignore_mismatched_sizes,
        cache_dir=model_args.cache_dir,
    )
    return model, not same_head


def init_head_small(model, scale: float) -> None:
    """Re-initialise the classifier at std 0.02 * `scale` with zero bias (the reference fine-tuning head)."""
    with torch.no_grad():
        torch.nn.init.trunc_normal_(model.classifier.weight, std=0.02)
        model.classifier.weight.mul_(scale)
        model.classifier.bias.zero_()


class MixingTrainer(Trainer):
    """`Trainer` for mixup/cutmix: soft-label cross-entropy in training, hard labels and plain batches in evaluation."""

    def __init__(self, *args, eval_collator=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.eval_collator = eval_collator

    def get_eval_dataloader(self, eval_dataset=None):
        train_collator, self.data_collator = self.data_collator, self.eval_collator
        try:
            return super().get_eval_dataloader(eval_dataset)
        finally:
            self.data_collator = train_collator

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        labels = inputs.get("labels")
        if labels is None or not labels.is_floating_point():
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        inputs = {k: v for k, v in inputs.items() if k != "labels"}
        outputs = model(**inputs)
        log_probs = torch.nn.functional.log_softmax(outputs.logits.float(), dim=-1)
        loss = -(labels * log_probs).sum(dim=-1).mean()
        return (loss, outputs) if return_outputs else loss


class EMACallback(TrainerCallback):
    """Exponential moving average of the weights, updated after every optimizer step."""

    def __init__(self, model, decay: float):
        from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

        self.ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.ema.update_parameters(model)


# --------------------------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None):
    parser = HfArgumentParser((ModelArguments, DataArguments, TrainingArguments))
    return parser.parse_args_into_dataclasses(args=argv)


def main(argv: list[str] | None = None) -> dict:
    """Run fine-tuning; returns the final evaluation metrics (and EMA metrics with --model_ema)."""
    return run(*parse_args(argv))


def run(model_args: ModelArguments, data_args: DataArguments, training_args: TrainingArguments) -> dict:
    import evaluate

    from . import ConvNextV2ImageProcessor
    from . import data as data_utils
    from .hub import ensure_hub_available, push_folder_to_hub
    from .metrics import metric_path
    from .model_card import CardInfo, accuracy_eval_results, save_model_card
    from .optim import create_optimizer
    from .plots import save_curves
    from .transforms import PretrainTransform

    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    push = training_args.push_to_hub
    if push:  # fail before any work; the Trainer's own push is replaced by ours (model, processor, card)
        ensure_hub_available("push the fine-tuned model (--push_to_hub)", training_args.hub_token)
        training_args.push_to_hub = False

    if data_args.train_dir and data_args.validation_dir and not data_args.dataset_name:
        data_utils.check_class_folders(data_args.train_dir, data_args.validation_dir)
    raw = data_utils.load_image_dataset(data_args.dataset_name, data_args.dataset_config_name, data_args.train_dir,
                                        data_args.validation_dir, cache_dir=model_args.cache_dir,
                                        token=training_args.hub_token)
    if "train" not in raw:
        raise ValueError(f"The dataset has no train split (splits: {list(raw)}).")
    train = raw["train"]
    image_column = data_utils.find_column(train, data_args.image_column_name, data_utils.IMAGE_COLUMN_CANDIDATES, "image")
    label_column = data_utils.find_column(train, data_args.label_column_name, data_utils.LABEL_COLUMN_CANDIDATES, "label")
    labels = label_names(train, label_column)
    if "validation" in raw:
        evaluation = raw["validation"]
        eval_labels = label_names(evaluation, label_column) if label_column in evaluation.column_names else None
        if eval_labels != labels:
            raise ValueError(f"Class mismatch: train has {len(labels)} classes {labels[:10]}, validation has "
                             f"{eval_labels if eval_labels is None else len(eval_labels)} {(eval_labels or [])[:10]}.")
    else:
        data_utils.check_not_empty(train, "train")
        split = train.train_test_split(data_args.train_val_split, seed=training_args.seed,
                                       stratify_by_column=label_column if hasattr(train.features[label_column], "names") else None)
        train, evaluation = split["train"], split["test"]
    train, evaluation = data_utils.undecoded(train, image_column), data_utils.undecoded(evaluation, image_column)
    if data_args.max_train_samples is not None:
        train = train.shuffle(seed=training_args.seed).select(range(min(data_args.max_train_samples, len(train))))
    if data_args.max_eval_samples is not None:
        evaluation = evaluation.select(range(min(data_args.max_eval_samples, len(evaluation))))
    skipped = 0
    if data_args.skip_corrupt_images:
        with training_args.main_process_first():
            train, dropped_train = data_utils.drop_unreadable(train, image_column)
            evaluation, dropped_eval = data_utils.drop_unreadable(evaluation, image_column)
        skipped = dropped_train + dropped_eval
        if skipped:
            logger.warning("Skipped %d unreadable image(s).", skipped)
    data_utils.check_not_empty(train, "train")
    data_utils.check_not_empty(evaluation, "evaluation")

    model, new_head = load_classifier(model_args, labels)
    if new_head:
        init_head_small(model, model_args.head_init_scale)
    processor = ConvNextV2ImageProcessor.for_training(
        model_args.image_processor_name or model_args.model_name_or_path, model_args.image_size,
        model.config.mask_cell_size)
    processor.return_bool_masked_pos = False

    train_transform = PretrainTransform(model_args.image_size, processor.image_mean, processor.image_std,
                                        scale=(data_args.crop_min_scale, 1.0))

    def train_batch(batch):
        images = [data_utils.open_image(cell) for cell in batch[image_column]]
        return {"pixel_values": [train_transform(image, None) for image in images], "labels": batch[label_column]}

    def eval_batch(batch):
        images = [data_utils.open_image(cell) for cell in batch[image_column]]
        return {"pixel_values": list(processor(images, return_tensors="pt")["pixel_values"]),
                "labels": batch[label_column]}

    train.set_transform(train_batch)
    evaluation.set_transform(eval_batch)

    metric = evaluate.load(metric_path("topk_accuracy"))

    def compute_metrics(prediction):
        return metric.compute(predictions=prediction.predictions, references=prediction.label_ids)

    mixing = data_args.mixup > 0 or data_args.cutmix > 0
    if mixing:
        collator = MixupCutmixCollator(len(labels), data_args.mixup, data_args.cutmix, data_args.mixup_switch_prob,
                                       training_args.label_smoothing_factor)
        training_args.label_smoothing_factor = 0.0  # folded into the soft labels
    training_args.remove_unused_columns = False
    optimizer = create_optimizer(model, training_args, model_args.layer_decay, model_args.layer_decay_type)
    callbacks = []
    if model_args.model_ema:
        callbacks.append(EMACallback(model, model_args.model_ema_decay))
    common = dict(model=model, args=training_args, train_dataset=train, eval_dataset=evaluation,
                  compute_metrics=compute_metrics, optimizers=(optimizer, None), callbacks=callbacks)
    if mixing:
        trainer = MixingTrainer(data_collator=collator, eval_collator=collate, **common)
    else:
        trainer = Trainer(data_collator=collate, **common)
    train_result = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    metrics = trainer.evaluate()
    if model_args.model_ema:
        ema_model = callbacks[0].ema.module
        trainer.model = trainer.model_wrapped = ema_model
        metrics.update(trainer.evaluate(metric_key_prefix="eval_ema"))
        trainer.model = trainer.model_wrapped = model
    metrics["train_loss"] = train_result.training_loss
    metrics["skipped_images"] = skipped

    if trainer.is_world_process_zero():
        output_dir = training_args.output_dir
        trainer.save_model(output_dir)
        processor.save_pretrained(output_dir)
        if model_args.model_ema:
            callbacks[0].ema.module.save_pretrained(os.path.join(output_dir, "ema"))
            processor.save_pretrained(os.path.join(output_dir, "ema"))
        history = trainer.state.log_history
        train_points = [(h["step"], h["loss"]) for h in history if "loss" in h]
        eval_points = [(h["step"], h["eval_top1_accuracy"]) for h in history if "eval_top1_accuracy" in h]
        plots = {}
        if train_points:
            save_curves({"train loss": tuple(map(list, zip(*train_points)))}, os.path.join(output_dir, "train_loss.png"),
                        "Fine-tuning loss")
            plots["Fine-tuning loss"] = "train_loss.png"
        if eval_points:
            save_curves({"top-1": tuple(map(list, zip(*eval_points)))}, os.path.join(output_dir, "eval_accuracy.png"),
                        "Validation top-1 accuracy", ylabel="accuracy")
            plots["Validation accuracy"] = "eval_accuracy.png"
        dataset_label = data_args.dataset_name or Path(data_args.train_dir).name
        start = model_args.model_name_or_path or f"{model_args.model_preset} from scratch"
        if model_args.model_name_or_path and os.path.isdir(model_args.model_name_or_path):
            start = f"`{Path(model_args.model_name_or_path).resolve().name}` (local checkpoint)"
        info = CardInfo(
            model_name=training_args.hub_model_id or Path(output_dir).name,
            summary=f"ConvNeXt V2 image classifier fine-tuned from {start}.",
            data=f"`{dataset_label}`: {len(train)} training and {len(evaluation)} evaluation images, "
                 f"{len(labels)} classes.",
            recipe={"epochs": str(training_args.num_train_epochs), "learning rate": str(training_args.learning_rate),
                    "batch size": str(training_args.per_device_train_batch_size),
                    "weight decay": str(training_args.weight_decay),
                    "layer-wise lr decay": f"{model_args.layer_decay} ({model_args.layer_decay_type})",
                    "drop path": str(model_args.drop_path_rate),
                    "label smoothing": str(collator.label_smoothing if mixing else training_args.label_smoothing_factor),
                    "mixup / cutmix": f"{data_args.mixup} / {data_args.cutmix}", "EMA": str(model_args.model_ema),
                    "image size": str(model_args.image_size)},
            results={k: f"{v:.4f}" if isinstance(v, float) else str(v) for k, v in metrics.items()
                     if "accuracy" in k or k in ("eval_loss", "train_loss")},
            eval_results=accuracy_eval_results(
                {k.removeprefix("eval_"): v for k, v in metrics.items() if k.startswith("eval_top")},
                dataset_label, data_args.dataset_name or "imagefolder", "validation"),
            plots=plots,
            datasets=[data_args.dataset_name] if data_args.dataset_name else None,
            base_model=model_args.model_name_or_path if model_args.model_name_or_path and not os.path.isdir(
                model_args.model_name_or_path) else None,
        )
        save_model_card(model, info, output_dir)
        with open(os.path.join(output_dir, "all_results.json"), "w") as handle:
            json.dump(metrics, handle, indent=2)
        with open(os.path.join(output_dir, "log_history.json"), "w") as handle:
            json.dump(history, handle)
        if push:
            push_folder_to_hub(output_dir, training_args.hub_model_id or Path(output_dir).name, training_args.hub_token)
    return metrics
