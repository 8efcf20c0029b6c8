"""Fine-tuning ConvNeXt V2 image classifiers with the `Trainer`, on `datasets` pipelines: the entry point behind
`examples/classification/run_finetune.py` and the demo.

Starts from an FCMAE checkpoint, a transformers-format ConvNeXt V2 classifier or a preset from scratch, and adds the
reference fine-tuning recipe: layer-wise learning-rate decay, a small re-initialised head, drop path, label
smoothing, optional EMA and mixup/cutmix. Top-1/top-5 accuracy come from the `evaluate` metric module shipped in the
package, so they work offline.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from datasets import IterableDataset
from transformers import HfArgumentParser, TrainingArguments
from transformers.trainer_utils import IntervalStrategy

from ..hub import ensure_hub_available, push_folder_to_hub
from ..metrics import metric_path
from .data import decoding, sources
from .arguments import (REFERENCE_TRAINER_DEFAULTS, DataArguments, FinetuningArguments, ModelArguments,
                        check_trainer_arguments, default_num_workers, flag_given, multi_cpu_config_run_alone,
                        parse_marking_given, use_cpu_processes)
from .device_settings import finetuning_pin_memory, finetuning_precision, trainer_precision_line, use_device_settings
from .data.transforms import FinetuneTransform, SeededAugmentedDataset
from ..outputs.staging import TRAINER_MARKER, save_folder_atomically, save_model_and_processor
from .checkpoints import check_same_model, find_checkpoint
from .data.mixup import MixupCutmixCollator
from .models import gathered_model, init_head_small, load_classifier, training_processor
from .recipes import FINETUNE_RECIPES, apply_recipe, card_lines, note_model
from ..outputs.output_dir import check_output_dir, checkpoint_bytes, claim_output_dir
from ..outputs.cards import CardInfo, accuracy_eval_results, inherited, save_model_card
from .plots import save_curves
from .data import labelled_streams
from .data.streams import KeepsStreamPositions
from .data.shared_memory import InSharedMemory, batch_bytes, check_shared_memory
from .data.folders import check_class_layout, folder_dataset, scan_folder
from .loops.trainer import (
    EMACallback, EpochCallback, FinetuningTrainer, PassCallback, MixingFinetuningTrainer, finished_run, planned_steps,
    seed_before_the_model, steps_per_epoch, total_train_batch)

logger = logging.getLogger(__name__)


@dataclass
class LabelledData:
    train: object
    evaluation: object
    image_column: str
    label_column: str
    labels: list[str]
    skipped: int
    ignored: int
    train_rows: int = 0  # images in a pass over the training data
    eval_rows: int | None = None  # None: a stream of unknown length
    streamed: bool = False
    shard_sizes: list[int] | None = None  # a stream's images per shard, where known


def parse_args(argv: list[str] | None = None):
    parser = HfArgumentParser((ModelArguments, DataArguments, FinetuningArguments, TrainingArguments),
                              description="Fine-tune a ConvNeXt V2 image classifier with the Trainer.")
    # Several processes without CUDA train together over gloo, not as independent runs that each think they are the
    # first.
    parser.set_defaults(**REFERENCE_TRAINER_DEFAULTS, dataloader_num_workers=default_num_workers(),
                        use_cpu=use_cpu_processes())
    return parse_marking_given(parser, argv)

# `--dataloader_persistent_workers true` augments correctly (the epoch that seeds it is in shared memory), but it
# stays off by default: with it, a killed and resumed run's losses left the uninterrupted run's from the epoch after
# the resume (test_killed_finetuning_resumes_to_the_uninterrupted_run), most likely because a persistent loader
# takes its workers' seed from the global RNG once per loader instead of once per epoch, which shifts drop path's.


def main(argv: list[str] | None = None) -> dict:
    """Run fine-tuning from command-line arguments; returns the final evaluation metrics."""
    return run(*parse_args(argv))


def run(model_args: ModelArguments, data_args: DataArguments, recipe: FinetuningArguments,
        training_args: TrainingArguments) -> dict:
    """Fine-tune: load and check the data, build the classifier, train with the Trainer, save a pipeline-ready
    folder with its card; returns the final metrics (and EMA metrics with --model_ema)."""
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    if recipe.recipe is not None:
        recipe.applied_recipe = apply_recipe(recipe.recipe, FINETUNE_RECIPES,
                                             training_args.world_size, "fine-tuning", model_args, recipe,
                                             training_args)
    check_trainer_arguments(training_args)
    if training_args.process_index == 0 and (alone := multi_cpu_config_run_alone()) is not None:
        logger.warning(alone)
    use_device_settings(recipe.deterministic)
    finetuning_precision(training_args, lambda name: flag_given(training_args, name))
    finetuning_pin_memory(training_args, lambda name: flag_given(training_args, name))
    check_ema_placement(recipe, training_args)
    push = training_args.push_to_hub
    if push:  # fail before any work; the Trainer's own push is replaced by ours (model, processor, card)
        ensure_hub_available("push the fine-tuned model (--push_to_hub)", training_args.hub_token)
        training_args.push_to_hub = False
    lock, resume = claim_and_resolve_output_dir(training_args, recipe)
    with lock:
        metrics = finetune(model_args, data_args, recipe, training_args, resume, push)
    close_process_group()
    return metrics


def close_process_group() -> None:
    """After a run that went well (not after an error, when a peer may still wait in a collective): a gloo group
    left open at exit can abort the process ("terminate called without an active exception")."""
    from accelerate import PartialState

    PartialState().destroy_process_group()


def finetune(model_args, data_args, recipe, training_args, resume: str | None, push: bool) -> dict:
    """The run itself, in an output folder this process holds."""
    data = load_labelled_data(data_args, recipe, training_args)
    if data.streamed:
        plan_streamed_run(training_args, data.train_rows)
    planned = planned_steps(training_args, data.train_rows)
    if resume and (results := finished_run(resume, training_args.output_dir, planned)) is not None:
        logger.warning("%s is the last step of a finished run; its results stay as they are.", resume)
        return results
    seed_before_the_model(training_args)
    model, new_head = load_classifier(model_args, recipe, data.labels)
    note_model(getattr(recipe, "applied_recipe", None), model.config)
    if new_head:
        init_head_small(model, recipe.head_init_scale)
    check_output_dir(training_args.output_dir, "--output_dir", resume=True, overwrite=True,
                     needed_bytes=checkpoint_bytes(model.num_parameters()))
    processor = training_processor(model_args.image_processor_name or model_args.model_name_or_path,
                                   model_args.image_size, model.config.mask_cell_size)
    complete_schedule(training_args, recipe, data.train_rows)
    largest = max(training_args.per_device_train_batch_size, training_args.per_device_eval_batch_size)
    check_shared_memory(training_args.dataloader_num_workers, batch_bytes(largest, model_args.image_size, 4),
                        training_args.dataloader_prefetch_factor)
    attach_transforms(data, processor, model_args, recipe, data_args, training_args)
    trainer = build_trainer(model, data, recipe, training_args)
    metrics = train_and_evaluate(trainer, resume, data)
    model = gathered_model(trainer.accelerator, trainer.model)  # all processes: under FSDP each holds a shard
    if trainer.is_world_process_zero():
        save_outputs(trainer, model, processor, metrics, data, model_args, data_args, recipe, training_args)
        if push:
            push_folder_to_hub(training_args.output_dir, training_args.hub_model_id or Path(training_args.output_dir).name,
                               training_args.hub_token)
    return metrics


def check_ema_placement(recipe: FinetuningArguments, training_args) -> None:
    """The EMA follows the model to its device; a sharded (FSDP) model has no whole copy to average."""
    if recipe.model_ema and (training_args.fsdp or os.environ.get("ACCELERATE_USE_FSDP", "").lower() in ("1", "true")):
        raise ValueError("--model_ema cannot be combined with FSDP (each process holds only a shard of the weights); "
                         "fine-tune with DDP (no --fsdp) for an EMA, or drop --model_ema.")


def claim_and_resolve_output_dir(training_args, recipe: FinetuningArguments):
    """Check and lock the output folder; returns the lock (a context manager) and the checkpoint to resume from
    (`latest` resolved), if any."""
    requested, lock = training_args.resume_from_checkpoint, contextlib.nullcontext()
    if training_args.process_index == 0:
        lock = claim_output_dir(training_args.output_dir, bool(requested), recipe.overwrite_output_dir)
    if not requested:
        return lock, None
    resolved = find_checkpoint(training_args.output_dir, requested, TRAINER_MARKER)
    training_args.resume_from_checkpoint = resolved
    return lock, resolved


def complete_schedule(training_args, recipe: FinetuningArguments, num_samples: int) -> None:
    """The reference's learning rate (`base_learning_rate` x total batch / 256) and warm-up in epochs, where the
    command line did not give `--learning_rate` or `--warmup_steps`."""
    if training_args.learning_rate is None:
        training_args.learning_rate = recipe.base_learning_rate * total_train_batch(training_args) / 256
    if not training_args.warmup_steps and recipe.warmup_epochs:
        training_args.warmup_steps = int(recipe.warmup_epochs * steps_per_epoch(num_samples, training_args))


def load_labelled_data(data_args: DataArguments, recipe: FinetuningArguments, training_args) -> LabelledData:
    """Train and evaluation splits (a held-out split of train when there is no validation set), checked."""
    if labelled_streams.streamed_source(data_args, recipe.streaming):
        return load_streamed_data(data_args, recipe, training_args)
    if data_args.validation_files:
        raise ValueError("--validation_files (shards) go with --train_files; beside --train_dir or --dataset_name, "
                         "pass --validation_dir or let the dataset's validation split be used.")
    raw, ignored = sources.load_image_dataset(data_args, labelled=True, token=training_args.hub_token)
    if "train" not in raw:
        raise ValueError(f"The dataset has no train split (splits: {list(raw)}).")
    train = raw["train"]
    image_column = sources.find_column(train, data_args.image_column_name, sources.IMAGE_COLUMN_CANDIDATES, "image")
    label_column = sources.find_column(train, recipe.label_column_name, sources.LABEL_COLUMN_CANDIDATES, "label")
    labels = sources.label_names(train, label_column)
    if "validation" in raw:
        evaluation = raw["validation"]
        eval_labels = sources.label_names(evaluation, label_column) if label_column in evaluation.column_names else None
        if eval_labels != labels:
            raise ValueError(f"Class mismatch: train has {len(labels)} classes {labels[:10]}, validation has "
                             f"{eval_labels if eval_labels is None else len(eval_labels)} {(eval_labels or [])[:10]}.")
    else:
        train, evaluation = held_out_split(train, label_column, labels, recipe.train_val_split, training_args.seed)
    train, evaluation = sources.undecoded(train, image_column), sources.undecoded(evaluation, image_column)
    if data_args.max_train_samples is not None:
        train = train.shuffle(seed=training_args.seed).select(range(min(data_args.max_train_samples, len(train))))
    if recipe.max_eval_samples is not None:
        evaluation = evaluation.select(range(min(recipe.max_eval_samples, len(evaluation))))
    train, evaluation, skipped = checked_images(train, evaluation, image_column, data_args, training_args)
    return LabelledData(train, evaluation, image_column, label_column, labels, skipped, ignored, len(train),
                        len(evaluation))


def load_streamed_data(data_args: DataArguments, recipe: FinetuningArguments, training_args) -> LabelledData:
    """Streamed training data (shards, or a hub dataset with --streaming), its labels and length, and a validation
    set: streamed shards or hub split, or a --validation_dir folder."""
    if data_args.max_train_samples is not None:
        raise ValueError("--max_train_samples picks images from a listed data set; a stream is read whole: pass fewer "
                         "--train_files, or --max_steps.")
    splits = labelled_streams.open_streamed_splits(data_args, training_args.hub_token)
    train = splits["train"]
    image_column = sources.find_column(train.stream, data_args.image_column_name, sources.IMAGE_COLUMN_CANDIDATES,
                                       "image")
    label_column = labelled_streams.find_label_column(train, recipe.label_column_name)
    labels = labelled_streams.split_class_names(train, label_column)
    if train.rows is None and training_args.max_steps <= 0:
        raise ValueError(f"{train.flag}: the number of training images is not known; pass --max_steps.")
    evaluation, eval_rows, skipped = streamed_evaluation(splits, labels, image_column, label_column, data_args, recipe,
                                                         training_args)
    return LabelledData(sources.undecoded(train.stream, image_column), evaluation, image_column, label_column, labels,
                        skipped, 0, train.rows or 0, eval_rows, streamed=True, shard_sizes=train.shard_sizes)


def streamed_evaluation(splits, labels, image_column, label_column, data_args, recipe, training_args):
    """(evaluation data, its size or None, images dropped): the streamed validation split, or a folder."""
    if "validation" in splits:
        split = splits["validation"]
        names = labelled_streams.split_class_names(split, labelled_streams.find_label_column(split, label_column))
        if names != labels:
            raise ValueError(f"Class mismatch: {splits['train'].flag} has {len(labels)} classes {labels[:10]}, "
                             f"{split.flag} has {len(names)} {names[:10]}.")
        stream = sources.undecoded(split.stream, image_column)
        if recipe.max_eval_samples is not None:
            stream = stream.take(recipe.max_eval_samples)
        rows = split.rows if recipe.max_eval_samples is None else min(recipe.max_eval_samples, split.rows or math.inf)
        return stream, rows, 0
    if data_args.validation_dir is None:
        raise ValueError(f"A streamed training set ({splits['train'].flag}) has no held-out split; pass "
                         "--validation_files (shards) or --validation_dir (a folder of class sub-folders).")
    scan = scan_folder(data_args.validation_dir, "--validation_dir", data_args.ignore_metadata)
    if check_class_layout(scan, "--validation_dir") != labels:
        raise ValueError(f"Class mismatch: the training stream has {len(labels)} classes {labels[:10]}, "
                         f"--validation_dir has {len(scan.classes)} {scan.classes[:10]}.")
    evaluation = sources.undecoded(folder_dataset(scan, labelled=True), "image")
    evaluation = evaluation.rename_columns({k: v for k, v in (("image", image_column), ("label", label_column))
                                            if k != v})
    if recipe.max_eval_samples is not None:
        evaluation = evaluation.select(range(min(recipe.max_eval_samples, len(evaluation))))
    with training_args.main_process_first():
        evaluation, skipped = decoding.checked_evaluation_split(evaluation, image_column, data_args)
    sources.check_not_empty(evaluation, "evaluation")
    return evaluation, len(evaluation), skipped


def plan_streamed_run(training_args, rows: int) -> None:
    """A stream is one `Trainer` epoch of `max_steps` (epochs x images / total batch unless given), read without
    the Trainer's skipping on resume (the stream resumes itself); evaluation and checkpoints each epoch become every
    pass's worth of steps."""
    per_pass = steps_per_epoch(rows, training_args) if rows else None
    if training_args.max_steps <= 0:
        training_args.max_steps = math.ceil(training_args.num_train_epochs * per_pass)
    training_args.ignore_data_skip = True
    for kind in ("eval", "save"):
        if getattr(training_args, f"{kind}_strategy") == IntervalStrategy.EPOCH:
            setattr(training_args, f"{kind}_strategy", IntervalStrategy.STEPS)
            setattr(training_args, f"{kind}_steps", min(per_pass or training_args.max_steps, training_args.max_steps))


def held_out_split(train, label_column: str, labels: list[str], fraction: float, seed: int):
    """A stratified `fraction` of train for evaluation (no --validation_dir): every class needs an image on both
    sides. Computed on the label column as one array (datasets' stratified split reads every row in Python)."""
    import numpy as np

    sources.check_not_empty(train, "train")
    if not hasattr(train.features[label_column], "names"):
        split = train.train_test_split(fraction, seed=seed)
        return split["train"], split["test"]
    classes = train.select_columns([label_column]).with_format("arrow")[:].column(0).to_numpy()
    counts = np.bincount(classes, minlength=len(labels))
    rare = int(counts.argmin())
    held_out = math.ceil(fraction * len(train))
    if counts[rare] < 2 or not len(labels) <= held_out <= len(train) - len(labels):
        raise ValueError(
            f"Cannot hold out --train_val_split {fraction} of {len(train)} training images with every one of the "
            f"{len(labels)} classes on both sides (class {labels[rare]!r} has {counts[rare]} image(s)); add "
            "images, change --train_val_split, or pass --validation_dir."
        )
    test = stratified_indices(classes, counts, held_out, np.random.default_rng(seed))
    rest = np.setdiff1d(np.arange(len(train)), test)
    return train.select(rest), train.select(np.sort(test))


def stratified_indices(classes, counts, total: int, rng):
    """`total` indices drawn class by class in proportion to `counts` (largest remainders; at least one of each
    class, and at least one left), each class's own indices shuffled by `rng`."""
    import numpy as np

    share = counts * total / counts.sum()
    take = np.clip(np.floor(share).astype(int), 1, counts - 1)
    for index in np.argsort(-(share - np.floor(share)), kind="stable"):
        if take.sum() >= total:
            break
        if take[index] < counts[index] - 1:
            take[index] += 1
    for index in np.argsort(-take, kind="stable"):  # a surplus from the at-least-one rule comes off the largest
        if take.sum() <= total:
            break
        if take[index] > 1:
            take[index] -= 1
    return np.concatenate([rng.permutation(np.flatnonzero(classes == c))[:take[c]] for c in range(len(counts))])


def checked_images(train, evaluation, image_column: str, data_args: DataArguments, training_args):
    """The evaluation images checked (or unreadable ones dropped) before training; training images are handled
    where they are decoded ([`UnreadableImages`])."""
    with training_args.main_process_first():
        evaluation, skipped = decoding.checked_evaluation_split(evaluation, image_column, data_args)
    if skipped:
        logger.warning("Skipped %d unreadable evaluation image(s).", skipped)
    sources.check_not_empty(train, "train")
    sources.check_not_empty(evaluation, "evaluation")
    return train, evaluation, skipped


def attach_transforms(data: LabelledData, processor, model_args, recipe, data_args, training_args) -> None:
    """Training: the reference's augmentation seeded per sample; evaluation: the processor (what a pipeline does)."""
    train_transform = FinetuneTransform.from_recipe(model_args.image_size, processor.image_mean, processor.image_std,
                                                    recipe)
    if data.streamed:
        return attach_stream_transforms(data, processor, train_transform, data_args, training_args)
    attach_processor_view(data, processor, data_args.max_image_pixels)
    unreadable = decoding.UnreadableImages(len(data.train), data_args.skip_corrupt_images, data_args.max_image_pixels)
    data.train = SeededAugmentedDataset(data.train, data.image_column, data.label_column, train_transform,
                                        training_args.seed, unreadable)


def attach_processor_view(data: LabelledData, processor, max_pixels: int) -> None:
    """A listed evaluation split, decoded when read and prepared by the processor, as a pipeline prepares images."""

    def eval_batch(batch):
        images = [decoding.decode_image(cell, max_pixels) for cell in batch[data.image_column]]
        return {"pixel_values": list(processor(images, return_tensors="pt")["pixel_values"]),
                "labels": batch[data.label_column]}

    data.evaluation.set_transform(eval_batch)


def attach_stream_transforms(data: LabelledData, processor, train_transform, data_args, training_args) -> None:
    """The streamed training set in this process's parts, augmented per (seed, epoch, index); a streamed validation
    split decoded as it is read, a validation folder as for listed data."""
    unreadable = decoding.UnreadableImages(0, data_args.skip_corrupt_images, data_args.max_image_pixels)
    data.train = labelled_streams.StreamedLabelledDataset(
        data.train, data.image_column, data.label_column, train_transform, training_args.seed, unreadable,
        rank=training_args.process_index, world=training_args.world_size, max_pixels=data_args.max_image_pixels,
        shard_sizes=data.shard_sizes)
    if isinstance(data.evaluation, IterableDataset):
        data.evaluation = labelled_streams.StreamedEvaluationDataset(
            data.evaluation, data.image_column, data.label_column, processor, data_args.skip_corrupt_images,
            data_args.max_image_pixels, rank=training_args.process_index, world=training_args.world_size)
    else:
        attach_processor_view(data, processor, data_args.max_image_pixels)


def collate(examples):
    return {"pixel_values": torch.stack([e["pixel_values"] for e in examples]),
            "labels": torch.tensor([e["labels"] for e in examples])}


def build_trainer(model, data: LabelledData, recipe: FinetuningArguments, training_args):
    """The crash-safe `Trainer` (or its soft-label twin for mixup/cutmix) with the recipe's optimizer, metrics, EMA."""
    import evaluate

    metric = evaluate.load(metric_path("topk_accuracy"))

    top_k = (1, 5) if len(data.labels) > 5 else (1,)  # top-5 of five classes or fewer is always 1

    def compute_metrics(prediction):
        return metric.compute(predictions=prediction.predictions, references=prediction.label_ids, top_k=top_k)

    training_args.remove_unused_columns = False
    ema = EMACallback(model, recipe.model_ema_decay) if recipe.model_ema else None
    common = dict(model=model, args=training_args, train_dataset=data.train, eval_dataset=data.evaluation,
                  compute_metrics=compute_metrics,
                  callbacks=[stream_or_epoch_callback(data, training_args)] + ([ema] if ema else []),
                  layer_decay=recipe.layer_decay, layer_decay_type=recipe.layer_decay_type)
    collator = None
    if recipe.mixup > 0 or recipe.cutmix > 0:
        collator = MixupCutmixCollator(len(data.labels), recipe.mixup, recipe.cutmix, recipe.mixup_switch_prob,
                                       training_args.label_smoothing_factor, seed=training_args.seed)
        training_args.label_smoothing_factor = 0.0  # folded into the soft labels
        trainer = MixingFinetuningTrainer(data_collator=InSharedMemory(KeepsStreamPositions(collator)),
                                          eval_collator=InSharedMemory(collate), **common)
    else:
        trainer = FinetuningTrainer(data_collator=InSharedMemory(KeepsStreamPositions(collate)), **common)
    trainer.ema = ema
    trainer.card_label_smoothing = getattr(collator, "label_smoothing", training_args.label_smoothing_factor)
    return trainer


def stream_or_epoch_callback(data: LabelledData, training_args):
    """Listed data: each epoch's number reaches the per-sample seeding; a stream: logs count its passes."""
    if data.streamed:
        return PassCallback(steps_per_epoch(data.train_rows, training_args) if data.train_rows else training_args.max_steps)
    return EpochCallback(data.train)


def train_and_evaluate(trainer, resume: str | None, data: LabelledData) -> dict:
    if resume:
        check_same_model(resume, trainer.model)
    if resume and trainer.ema is not None:
        trainer.ema.load(resume)
    if resume and data.streamed:
        trainer.resume_stream(resume)
    train_result = trainer.train(resume_from_checkpoint=resume)
    metrics = trainer.evaluate()
    if trainer.ema is not None:
        model = trainer.model
        trainer.model = trainer.model_wrapped = trainer.ema.ema.module
        metrics.update(trainer.evaluate(metric_key_prefix="eval_ema"))
        trainer.model = trainer.model_wrapped = model
    metrics["train_loss"] = train_result.training_loss
    unreadable = data.train.unreadable.count(trainer.accelerator)
    metrics["skipped_images"] = data.skipped + (unreadable or 0)
    metrics["ignored_files"] = data.ignored
    return metrics


def save_outputs(trainer, model, processor, metrics, data: LabelledData, model_args, data_args, recipe,
                 training_args):
    """The pipeline-ready folder: `model` (the trained one, whole), processor, EMA copy, curves, card, results and
    log history."""
    output_dir, ema = training_args.output_dir, trainer.ema

    history = trainer.state.log_history
    smoothing = trainer.card_label_smoothing

    def write(folder: Path) -> None:
        save_model_and_processor(model, processor, folder)
        if ema is not None:
            save_model_and_processor(ema.ema.module, processor, folder / "ema")
        plots = save_finetuning_curves(history, str(folder))
        card = finetuning_card(metrics, data, plots, smoothing, model_args, data_args, recipe, training_args)
        save_model_card(model, card, str(folder))
        with open(folder / "all_results.json", "w") as handle:
            json.dump(metrics, handle, indent=2)
        with open(folder / "log_history.json", "w") as handle:
            json.dump(history, handle)

    save_folder_atomically(output_dir, write, "the fine-tuned model", TRAINER_MARKER)


def save_finetuning_curves(history: list[dict], output_dir: str) -> dict[str, str]:
    plots = {}
    train_points = [(h["step"], h["loss"]) for h in history if "loss" in h]
    eval_points = [(h["step"], h["eval_top1_accuracy"]) for h in history if "eval_top1_accuracy" in h]
    if train_points:
        save_curves({"train loss": tuple(map(list, zip(*train_points)))}, os.path.join(output_dir, "train_loss.png"),
                    "Fine-tuning loss")
        plots["Fine-tuning loss"] = "train_loss.png"
    if eval_points:
        save_curves({"top-1": tuple(map(list, zip(*eval_points)))}, os.path.join(output_dir, "eval_accuracy.png"),
                    "Validation top-1 accuracy", ylabel="accuracy")
        plots["Validation accuracy"] = "eval_accuracy.png"
    return plots


def finetuning_card(metrics, data: LabelledData, plots, smoothing, model_args, data_args, recipe, training_args) -> CardInfo:
    dataset_label = sources.dataset_label(data_args)
    evaluation_count = "a stream of" if data.eval_rows is None else data.eval_rows
    start = model_args.model_name_or_path or f"{model_args.model_preset} from scratch"
    local_start = model_args.model_name_or_path and os.path.isdir(model_args.model_name_or_path)
    if local_start:
        start = f"`{Path(model_args.model_name_or_path).resolve().name}` (local checkpoint)"
    return CardInfo(
        model_name=training_args.hub_model_id or Path(training_args.output_dir).name,
        summary=f"ConvNeXt V2 image classifier fine-tuned from {start}.",
        data=f"`{dataset_label}`: {data.train_rows} training and {evaluation_count} evaluation images, "
             f"{len(data.labels)} classes{', streamed' if data.streamed else ''}.",
        recipe={"epochs": (str(training_args.num_train_epochs) if training_args.max_steps <= 0
                           else f"{training_args.max_steps} steps (--max_steps)"),
                "learning rate": str(training_args.learning_rate),
                "batch size": str(training_args.per_device_train_batch_size),
                "weight decay": str(training_args.weight_decay),
                "layer-wise lr decay": f"{recipe.layer_decay} ({recipe.layer_decay_type})",
                "drop path": str(recipe.drop_path_rate), "label smoothing": str(smoothing),
                "mixup / cutmix": f"{recipe.mixup} / {recipe.cutmix}", "EMA": str(recipe.model_ema),
                "precision": trainer_precision_line(training_args),
                "RandAugment": recipe.aa, "random erasing": f"{recipe.reprob} ({recipe.remode}, {recipe.recount}x)",
                "image size": str(model_args.image_size)} | card_lines(getattr(recipe, "applied_recipe", None)),
        results={k: f"{v:.4f}" if isinstance(v, float) else str(v) for k, v in metrics.items()
                 if "accuracy" in k or k in ("eval_loss", "train_loss")},
        eval_results=accuracy_eval_results(
            {k.removeprefix("eval_"): v for k, v in metrics.items() if k.startswith("eval_top")},
            dataset_label, data_args.dataset_name or "imagefolder", "validation"),
        plots=plots,
        datasets=[data_args.dataset_name] if data_args.dataset_name else None,
        **inherited(model_args.model_name_or_path),
    )
