"""FCMAE pre-training of ConvNeXt V2 with Accelerate, on `datasets` pipelines: the entry point behind
`examples/pretraining/run_fcmae.py` and the demo.

Defaults follow the reference recipe (`main_pretrain.py`): AdamW (0.9, 0.95), weight decay 0.05 (not on norms,
biases, GRN or the mask token), learning rate `base_learning_rate * total_batch / 256`, cosine schedule with
warm-up, RandomResizedCrop(scale 0.2-1) + flip, normalised pixel targets.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from transformers import HfArgumentParser, get_scheduler

from ..hub import ensure_hub_available, push_folder_to_hub
from ..masking import random_masking
from .data import decoding, sources
from .arguments import (DataArguments, ModelArguments, PretrainingArguments, default_num_workers,
                        multi_cpu_config_run_alone, parse_marking_given, use_cpu_processes)
from .data.transforms import PretrainTransform
from ..outputs.staging import PRETRAINING_MARKER, save_folder_atomically, save_model_and_processor
from .device_settings import default_mixed_precision, precision_description, use_device_settings
from .loops.fcmae import FCMAERun, TrainingPlan, TrainingState, keep_gradient_buffers, resume, train
from .data.masked_datasets import (
    EpochSampler, EvaluationMaskedDataset, MaskedImageDataset, StreamingMaskedImageDataset, collate)
from .models import build_fcmae, gathered_model
from .loops.optim import param_groups
from ..outputs.output_dir import check_output_dir, checkpoint_bytes, claim_output_dir
from .recipes import PRETRAIN_RECIPES, apply_recipe, card_lines, note_model
from ..outputs.cards import CardInfo, inherited, save_model_card
from .plots import save_curves, save_reconstruction_grid
from .data.shards import expand_shard_patterns, open_shards, shard_row_counts, sharded_source
from .data.shared_memory import InSharedMemory, batch_bytes, check_shared_memory

logger = logging.getLogger(__name__)


@dataclass
class PretrainingData:
    train: object
    validation: object | None
    image_column: str
    skipped: int  # evaluation images dropped before training
    ignored: int
    shard_sizes: list[int | None] | None = None  # shards' recorded sizes: a resumed stream skips finished ones


def parse_args(argv: list[str] | None = None):
    parser = HfArgumentParser((ModelArguments, DataArguments, PretrainingArguments),
                              description="Pre-train ConvNeXt V2 with FCMAE (Accelerate).")
    return parse_marking_given(parser, argv)


def main(argv: list[str] | None = None) -> dict:
    """Run pre-training from command-line arguments; returns a summary (final loss, steps, paths)."""
    return run(*parse_args(argv))


def run(model_args: ModelArguments, data_args: DataArguments, args: PretrainingArguments) -> dict:
    """Pre-train: check everything that can fail early, build data and model, train, save the hub-ready folder."""
    from accelerate.utils import set_seed

    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    if args.push_to_hub:  # fail before any work
        ensure_hub_available("push the pre-trained model (--push_to_hub)", args.hub_token)
    if (source := sharded_source(data_args)) is not None:
        refuse_validation_beside_shards(data_args, source[1])
        stream_shards(args)
    check_streamed_checkpoints(args)
    if args.recipe is not None:  # before the accelerator, which takes the accumulation steps
        args.applied_recipe = apply_recipe(args.recipe, PRETRAIN_RECIPES,
                                           int(os.environ.get("WORLD_SIZE", "1")), "pre-training", model_args, args)
    accelerator = build_accelerator(args)
    set_seed(args.seed)
    with claim_main_process_output_dir(args, accelerator):
        results = pretrain(accelerator, model_args, data_args, args)
    # trackers finished, and the process group closed: at exit a live gloo group can abort the process
    # ("terminate called without an active exception") after a run that went well
    accelerator.end_training()
    return results


def pretrain(accelerator, model_args: ModelArguments, data_args: DataArguments, args: PretrainingArguments) -> dict:
    """The run itself, in an output folder this process holds."""
    model, processor = build_fcmae(model_args, args)  # before the data: its size checks are cheaper
    note_model(getattr(args, "applied_recipe", None), model.config)
    check_free_space(args, model, accelerator)
    data = load_data(data_args, args, accelerator)
    fcmae_run = prepare_run(accelerator, model, processor, data, model_args, data_args, args)
    state = resume(fcmae_run, args.resume_from_checkpoint) if args.resume_from_checkpoint else TrainingState()
    if (results := finished_run(state, fcmae_run.plan, args.output_dir)) is not None:
        logger.warning("The checkpoint is the last step of a finished run; its results stay as they are.")
        return results
    start_reporting(fcmae_run, state, processor)
    started, first_step = time.perf_counter(), state.completed_steps
    try:
        state = train(fcmae_run, state)
    finally:
        fcmae_run.progress.close()  # an error message then starts on a line of its own
    speed = training_speed(fcmae_run, state.completed_steps - first_step, time.perf_counter() - started)
    return finish(fcmae_run, state, data, processor, model_args, data_args, speed)


def training_speed(fcmae_run: FCMAERun, steps: int, seconds: float) -> dict:
    """The Trainer's `train_runtime` and `train_samples_per_second` for this run's steps, printed once."""
    images = steps * fcmae_run.plan.total_batch
    speed = {"train_runtime": round(seconds, 3), "train_samples_per_second": round(images / max(seconds, 1e-9), 3)}
    fcmae_run.accelerator.print(
        f"{steps} steps in {seconds:.1f} s: {speed['train_samples_per_second']:.1f} images/s "
        f"({speed['train_samples_per_second'] / fcmae_run.accelerator.num_processes:.1f} per process), first "
        "steps, any compilation and validation included")
    return speed


def finished_run(state: TrainingState, plan: TrainingPlan, output_dir: str) -> dict | None:
    """The saved summary, if resuming at the last step of a run whose results are already written."""
    results = Path(output_dir, "train_results.json")
    if state.completed_steps < plan.max_train_steps or not results.is_file():
        return None
    saved = json.loads(results.read_text())
    return saved | {"history": saved.pop("loss_history", [])}


def stream_shards(args: PretrainingArguments) -> None:
    """Shards are read as a stream: that needs a step count (a stream has no length)."""
    if args.max_train_steps is None:
        raise ValueError("Shards are streamed, and a stream has no length to count epochs by: pass --max_train_steps.")
    args.streaming = True


def check_streamed_checkpoints(args: PretrainingArguments) -> None:
    """Processes reach the end of their own part of a stream at different steps: a checkpoint there would wait for
    the others, who are still training; streamed runs checkpoint every N steps instead."""
    if args.streaming and args.checkpointing_steps == "epoch":
        raise ValueError("--checkpointing_steps epoch cannot be used with a stream (each process's part ends at its "
                         "own step); give a number of steps.")


def build_accelerator(args: PretrainingArguments):
    """Accelerate's accelerator: bf16 by default on CUDA, batches copied to the GPU without blocking, the model
    compiled by inductor with `--torch_compile` (one graph, static shapes: the step never recompiles)."""
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration, TorchDynamoPlugin

    use_device_settings(args.deterministic)
    compiled = TorchDynamoPlugin(backend="inductor", mode=args.torch_compile_mode or "default", fullgraph=True,
                                 dynamic=False) if args.torch_compile else None
    accelerator = Accelerator(
        cpu=use_cpu_processes(),
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=default_mixed_precision(args.mixed_precision),
        log_with=args.report_to if args.with_tracking else None,
        project_dir=args.output_dir,
        dataloader_config=DataLoaderConfiguration(non_blocking=torch.cuda.is_available()),
        dynamo_plugin=compiled,
    )
    say_if_not_as_configured(accelerator)
    return accelerator


def say_if_not_as_configured(accelerator) -> None:
    """Accelerate falls back quietly (e.g. FSDP asked for on CPU processes runs as DDP); say so in one line, once
    (the main process)."""
    if not accelerator.is_main_process:
        return
    if (alone := multi_cpu_config_run_alone()) is not None:
        logger.warning(alone)
    asked = [kind for variable, kind in (("ACCELERATE_USE_FSDP", "FSDP"), ("ACCELERATE_USE_DEEPSPEED", "DEEPSPEED"))
             if os.environ.get(variable, "false").lower() in ("1", "true")]
    running = accelerator.distributed_type.value
    described = {"NO": "one process without distribution", "MULTI_CPU": "CPU data parallelism (DDP over gloo)",
                 "MULTI_GPU": "DDP"}.get(running, running)
    for kind in asked:
        if running != kind:
            logger.warning("The Accelerate config asks for %s, but this run is %s on %d process(es) (%s): its memory "
                           "use and checkpoints are those of %s.", kind, described, accelerator.num_processes,
                           accelerator.device.type, described)


def refuse_validation_beside_shards(data_args: DataArguments, flag: str) -> None:
    """A streamed pre-training run has no validation pass yet: a validation set given with it would not be read."""
    given = data_args.validation_dir or data_args.validation_files
    if given:
        name = "--validation_dir" if data_args.validation_dir else "--validation_files"
        raise ValueError(f"{name} {given!r} would not be read: a pre-training run streamed from shards ({flag}) has no "
                         f"validation pass yet; drop {name}, or pre-train from an image folder.")


def claim_main_process_output_dir(args: PretrainingArguments, accelerator):
    """Check the output folder and lock it (main process); a context manager for the rest of the run."""
    lock = contextlib.nullcontext()
    if accelerator.is_main_process:
        lock = claim_output_dir(args.output_dir, bool(args.resume_from_checkpoint), args.overwrite_output_dir)
    accelerator.wait_for_everyone()
    return lock


def check_free_space(args: PretrainingArguments, model, accelerator) -> None:
    if accelerator.is_main_process:
        needed = checkpoint_bytes(model.num_parameters(), with_optimizer=args.checkpointing_steps is not None)
        check_output_dir(args.output_dir, "--output_dir", resume=True, needed_bytes=needed)


def load_data(data_args: DataArguments, args: PretrainingArguments, accelerator) -> PretrainingData:
    """The train (and optional validation) split, with unreadable images dropped or reported before training."""
    raw, ignored, sizes = open_training_images(data_args, args)
    if "train" not in raw:
        raise ValueError(f"The dataset has no train split (splits: {list(raw)}).")
    image_column = sources.find_column(raw["train"], data_args.image_column_name,
                                          sources.IMAGE_COLUMN_CANDIDATES, "image")
    splits = {name: sources.undecoded(raw[name], image_column) for name in ("train", "validation") if name in raw}
    if data_args.max_train_samples is not None:
        train = splits["train"]
        splits["train"] = (train.take(data_args.max_train_samples) if args.streaming
                           else train.select(range(min(data_args.max_train_samples, len(train)))))
    skipped = 0
    if "validation" in splits and not args.streaming:  # the training images are handled where they are decoded
        with accelerator.main_process_first():
            splits["validation"], skipped = decoding.checked_evaluation_split(splits["validation"], image_column,
                                                                              data_args)
    for name, split in splits.items():
        sources.check_not_empty(split, name)
    if data_args.max_train_samples is not None:  # `take` cuts the shards short of their recorded sizes
        sizes = None
    return PretrainingData(splits["train"], splits.get("validation"), image_column, skipped, ignored, sizes)


def open_training_images(data_args: DataArguments, args: PretrainingArguments):
    """(splits, non-image files ignored, images per shard or None): shards are checked once and their recorded sizes
    read with them (none are counted here: only a resume uses them); anything else is `sources`' to open."""
    source = None if data_args.dataset_name is not None else sharded_source(data_args)
    if source is None:
        return (*sources.load_image_dataset(data_args, streaming=args.streaming, token=args.hub_token), None)
    builder, files = expand_shard_patterns(*source)
    return open_shards(builder, files, source[1]), 0, shard_row_counts(files, builder, count_missing=False)


def prepare_run(accelerator, model, processor, data: PretrainingData, model_args, data_args, args) -> FCMAERun:
    """Data loaders, optimizer and schedule, prepared by Accelerate."""
    config = model.config
    transform = PretrainTransform(model_args.image_size, processor.image_mean, processor.image_std,
                                  scale=(args.crop_min_scale, 1.0), uint8=True)  # normalised on the device

    def draw_mask(pixel_values, generator):
        seed = int(torch.randint(0, 2**31 - 1, (1,), generator=generator))
        mask = processor.draw_masks([tuple(pixel_values.shape[-2:])], config.mask_ratio, config.mask_cell_size, seed)
        return torch.as_tensor(mask[0])

    train_dataset, sampler, train_loader = train_loader_for(data, transform, draw_mask, data_args, args, accelerator)
    eval_loader = None
    if data.validation is not None and not args.streaming:
        evaluation = EvaluationMaskedDataset(data.validation, data.image_column, processor, draw_mask, args.seed,
                                             data_args.max_image_pixels)
        eval_loader = DataLoader(evaluation, batch_size=args.per_device_train_batch_size, collate_fn=collate)
    learning_rate = TrainingPlan.learning_rate_for(args, accelerator.num_processes)
    optimizer = torch.optim.AdamW(
        [{k: v for k, v in g.items() if k != "names"} for g in param_groups(model, args.weight_decay, recipe="pretrain")],
        lr=learning_rate, betas=(args.adam_beta1, args.adam_beta2),
    )
    if args.streaming:  # not Accelerate's loader: it would read the whole stream in every process (or the first)
        model, optimizer = accelerator.prepare(model, optimizer)
    else:
        model, optimizer, train_loader = accelerator.prepare(model, optimizer, train_loader)
    if eval_loader is not None:
        eval_loader = accelerator.prepare(eval_loader)
    plan = TrainingPlan.from_args(args, None if args.streaming else len(train_loader), accelerator.num_processes)
    scheduler = accelerator.prepare(get_scheduler(
        args.lr_scheduler_type, optimizer, num_warmup_steps=plan.warmup_steps * accelerator.num_processes,
        num_training_steps=plan.max_train_steps * accelerator.num_processes))
    pixel_stats = tuple(stat.to(accelerator.device) for stat in (transform.mean, transform.std))
    cuda_graphs = args.torch_compile and args.torch_compile_mode == "reduce-overhead"
    if cuda_graphs:
        keep_gradient_buffers(model)
    return FCMAERun(accelerator, model, optimizer, scheduler, train_loader, train_dataset, sampler, plan, args,
                    eval_loader=eval_loader, pixel_stats=pixel_stats, cuda_graphs=cuda_graphs)


def train_loader_for(data: PretrainingData, transform, draw_mask, data_args, args, accelerator):
    """(dataset, sampler or None, loader): seeded per-sample augmentation and masks, a seeded order per epoch."""
    common = dict(image_column=data.image_column, transform=transform, draw_mask=draw_mask, seed=args.seed,
                  max_pixels=data_args.max_image_pixels, skip_unreadable=data_args.skip_corrupt_images)
    workers = default_num_workers() if args.dataloader_num_workers is None else args.dataloader_num_workers
    check_shared_memory(workers, batch_bytes(args.per_device_train_batch_size, transform.size, 1))  # uint8 crops
    loading = dict(batch_size=args.per_device_train_batch_size, collate_fn=InSharedMemory(collate), num_workers=workers,
                   pin_memory=torch.cuda.is_available())
    if args.streaming:  # workers restart each epoch, so they see the epoch that seeds the stream's order
        dataset = StreamingMaskedImageDataset(data.train, **common, rank=accelerator.process_index,
                                              world=accelerator.num_processes, shard_sizes=data.shard_sizes)
        return dataset, None, DataLoader(dataset, **loading)
    dataset = MaskedImageDataset(data.train, **common)
    sampler = EpochSampler(len(dataset), args.seed)  # the epoch travels with each index: workers can persist
    loader = DataLoader(dataset, sampler=sampler, drop_last=True, persistent_workers=workers > 0, **loading)
    if len(loader) == 0:
        raise ValueError(f"{len(dataset)} training images are fewer than one batch of "
                         f"{args.per_device_train_batch_size}; lower --per_device_train_batch_size.")
    return dataset, sampler, loader


def precision_line(accelerator, args: PretrainingArguments) -> str:
    """What the run computed in, said in the log and on the card."""
    extras = [word for word, on in (("compiled", args.torch_compile), ("deterministic", args.deterministic)) if on]
    return (precision_description(accelerator.mixed_precision, accelerator.device.type)
            + (f", {', '.join(extras)}" if extras else ""))


def start_reporting(fcmae_run: FCMAERun, state: TrainingState, processor) -> None:
    from tqdm.auto import tqdm

    accelerator, args, plan = fcmae_run.accelerator, fcmae_run.args, fcmae_run.plan
    if args.with_tracking:
        accelerator.init_trackers("fcmae", {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool))})
    model = accelerator.unwrap_model(fcmae_run.model, keep_torch_compile=False)
    args.precision = precision_line(accelerator, args)  # for the card too
    accelerator.print(
        f"FCMAE pre-training: {model.num_parameters() / 1e6:.2f} M parameters, {plan.max_train_steps} steps, total "
        f"batch {plan.total_batch}, lr {plan.learning_rate:.2e}, mask ratio {model.config.mask_ratio}, "
        f"{args.precision}"
    )
    fcmae_run.progress = tqdm(range(plan.max_train_steps), initial=state.completed_steps,
                              disable=not accelerator.is_local_main_process, desc="FCMAE pre-training")


def finish(fcmae_run: FCMAERun, state: TrainingState, data: PretrainingData, processor, model_args, data_args,
           speed: dict) -> dict:
    """Save the model, processor, pictures, card and results (main process), then push if asked."""
    accelerator, args = fcmae_run.accelerator, fcmae_run.args
    history = state.history
    unreadable = fcmae_run.train_dataset.unreadable.count(accelerator)
    skipped = None if unreadable is None and not data.skipped else data.skipped + (unreadable or 0)
    summary = {"completed_steps": state.completed_steps, "history": history,
               "final_loss": history[-1][1] if history else None, "skipped_images": skipped,
               "ignored_files": data.ignored, "validation_loss": state.validation, **speed}
    accelerator.wait_for_everyone()
    model = gathered_model(accelerator, fcmae_run.model)
    if accelerator.is_main_process:

        def write(folder: Path) -> None:
            save_model_and_processor(model, processor, folder)
            write_report(model, processor, state, data, fcmae_run.plan, model_args, data_args, args, folder,
                         fcmae_run.train_dataset.unreadable)
            with open(folder / "train_results.json", "w") as handle:
                json.dump({k: v for k, v in summary.items() if k != "history"} | {"loss_history": history}, handle)

        save_folder_atomically(args.output_dir, write, "the final model", PRETRAINING_MARKER)
        if args.push_to_hub:
            push_folder_to_hub(args.output_dir, args.hub_model_id or Path(args.output_dir).name, args.hub_token)
    accelerator.wait_for_everyone()
    return summary


def preview_batch(dataset, image_column: str, processor, unreadable, count: int = 8) -> torch.Tensor:
    """A few images center-cropped by the processor, evenly spread over the dataset (so several classes show);
    unreadable ones are stood in for as in training."""
    if hasattr(dataset, "__len__"):
        step = max(1, len(dataset) // count)
        images = [unreadable.row_and_image(dataset, i, image_column)[1]
                  for i in range(0, min(len(dataset), step * count), step)]
    else:
        images = []
        for row in dataset.take(4 * count):
            with contextlib.suppress(decoding.UnreadableImageError):
                images.append(decoding.decode_image(decoding.stream_image_cell(row, image_column),
                                                    unreadable.max_pixels))
        images = images[:count]
    return processor(images, return_tensors="pt")["pixel_values"]


def write_report(model, processor, state: TrainingState, data, plan: TrainingPlan, model_args, data_args, args,
                 out: Path, unreadable) -> None:
    """Loss curve, reconstruction grid and the model card, written into `out`."""
    config = model.config
    curves = {"train": tuple(map(list, zip(*state.history))) if state.history else ([], [])}
    if state.validation:
        curves["validation"] = tuple(map(list, zip(*state.validation)))
    save_curves(curves, os.path.join(out, "loss_curve.png"), "FCMAE pre-training loss")
    preview = preview_batch(data.train, data.image_column, processor, unreadable).to(model.device)
    grid = (model_args.image_size // config.mask_cell_size,) * 2
    mask = random_masking(preview.shape[0], grid, config.mask_ratio, generator=torch.Generator().manual_seed(args.seed))
    save_reconstruction_grid(model, preview, os.path.join(out, "reconstructions.png"), processor.image_mean,
                             processor.image_std, bool_masked_pos=mask.to(preview.device))
    tail = [loss for _, loss in state.history[-max(1, len(state.history) // 10):]]
    results = {"final training loss (mean of last 10% of steps)": f"{sum(tail) / len(tail):.4f}"} if tail else {}
    if state.validation:
        results["validation loss (masked reconstruction, last epoch)"] = f"{state.validation[-1][1]:.4f}"
    source = (f"`{data_args.dataset_name}`" if data_args.dataset_name else
              f"images from the `{sources.dataset_label(data_args)}` {'shards' if args.streaming else 'folder'}")
    count = " (streamed)" if args.streaming else f", {len(data.train)} training images"
    save_model_card(model, CardInfo(
        model_name=args.hub_model_id or Path(args.output_dir).name,
        summary="ConvNeXt V2 pre-trained without labels by FCMAE (fully convolutional masked autoencoder).",
        data=source + count,
        recipe={"steps": str(state.completed_steps), "total batch": str(plan.total_batch),
                "learning rate": f"{plan.learning_rate:.3g}",
                "schedule": f"{args.lr_scheduler_type}, {plan.warmup_steps} warm-up steps",
                "optimizer": f"AdamW ({args.adam_beta1}, {args.adam_beta2}), weight decay {args.weight_decay}",
                "mask ratio": str(config.mask_ratio), "image size": str(model_args.image_size),
                "norm_pix_loss": str(config.norm_pix_loss),
                "precision": args.precision,
                "augmentation": f"RandomResizedCrop(scale {args.crop_min_scale}-1.0) + horizontal flip"}
               | card_lines(getattr(args, "applied_recipe", None)),
        results=results, plots={"Pre-training loss": "loss_curve.png",
                                "Reconstructions (input, masked, reconstruction)": "reconstructions.png"},
        datasets=[data_args.dataset_name] if data_args.dataset_name else None,
        **inherited(model_args.model_name_or_path),
    ), out)
