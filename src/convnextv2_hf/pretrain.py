"""FCMAE pre-training of ConvNeXt V2 with Accelerate, on `datasets` pipelines.

The loop behind `examples/pretraining/run_fcmae.py` and the demo. Defaults follow the reference recipe: AdamW
(0.9, 0.95), weight decay 0.05 (not on norms, biases, GRN or the mask token), learning rate
`base_learning_rate * total_batch / 256`, cosine schedule with warm-up, RandomResizedCrop(scale 0.2-1) + flip.

Augmentations and masks are seeded per sample from (seed, epoch, index), and the data order per epoch from
(seed, epoch): a resumed run, or the same global batch split over several processes, sees the same data.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shutil
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset as TorchDataset, IterableDataset as TorchIterableDataset, Sampler

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------- arguments


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Pre-train ConvNeXt V2 with FCMAE (Accelerate).")
    data = p.add_argument_group("data")
    data.add_argument("--dataset_name", help="Hub dataset name (needs network or the local datasets cache)")
    data.add_argument("--dataset_config_name")
    data.add_argument("--train_dir", help="folder of images (sub-folders are fine), read with the imagefolder builder")
    data.add_argument("--validation_dir")
    data.add_argument("--image_column_name", help="default: the first of image, img, ...")
    data.add_argument("--streaming", action="store_true", help="stream the dataset (needs --max_train_steps)")
    data.add_argument("--max_train_samples", type=int)
    data.add_argument("--skip_corrupt_images", action="store_true", help="drop unreadable images instead of failing")
    data.add_argument("--cache_dir")
    data.add_argument("--dataloader_num_workers", type=int, default=0)
    model = p.add_argument_group("model")
    model.add_argument("--model_name_or_path", help="an FCMAE checkpoint to continue from")
    model.add_argument("--model_preset", default="atto", help="size for a new model: atto ... huge")
    model.add_argument("--config_overrides", help='e.g. "patch_size=2,decoder_hidden_size=128,depths=[1,1,3,1]"')
    model.add_argument("--image_processor_name")
    model.add_argument("--image_size", type=int, default=224)
    model.add_argument("--mask_ratio", type=float)
    model.add_argument("--norm_pix_loss", action="store_true")
    model.add_argument("--sparse_backend", choices=["dense", "gather", "minkowski"])
    model.add_argument("--sparse_grn_scope", choices=["batch", "sample"])
    model.add_argument("--mask_strategy", choices=["fcmae", "mixmae"])
    model.add_argument("--crop_min_scale", type=float, default=0.2)
    train = p.add_argument_group("training")
    train.add_argument("--output_dir", required=True)
    train.add_argument("--overwrite_output_dir", action="store_true")
    train.add_argument("--seed", type=int, default=42)
    train.add_argument("--per_device_train_batch_size", type=int, default=64)
    train.add_argument("--gradient_accumulation_steps", type=int, default=1)
    train.add_argument("--base_learning_rate", type=float, default=1.5e-4, help="lr = base * total batch / 256")
    train.add_argument("--learning_rate", type=float, help="absolute learning rate (overrides the scaling)")
    train.add_argument("--weight_decay", type=float, default=0.05)
    train.add_argument("--adam_beta1", type=float, default=0.9)
    train.add_argument("--adam_beta2", type=float, default=0.95)
    train.add_argument("--num_train_epochs", type=float, default=800)
    train.add_argument("--max_train_steps", type=int, help="overrides --num_train_epochs")
    train.add_argument("--lr_scheduler_type", default="cosine")
    train.add_argument("--warmup_epochs", type=float, default=40)
    train.add_argument("--num_warmup_steps", type=int, help="overrides --warmup_epochs")
    train.add_argument("--mixed_precision", choices=["no", "fp16", "bf16"], default=None)
    train.add_argument("--checkpointing_steps", help='an integer (every N steps) or "epoch"')
    train.add_argument("--resume_from_checkpoint", help='a checkpoint folder, or "latest" in --output_dir')
    train.add_argument("--with_tracking", action="store_true", help="log to --report_to (TensorBoard)")
    train.add_argument("--report_to", default="tensorboard")
    train.add_argument("--logging_steps", type=int, default=10)
    hub = p.add_argument_group("hub")
    hub.add_argument("--push_to_hub", action="store_true")
    hub.add_argument("--hub_model_id")
    hub.add_argument("--hub_token")
    return p


def parse_config_overrides(text: str | None) -> dict:
    """`key=value,...` with JSON values where they parse (`depths=[1,1,3,1]`), strings otherwise."""
    if not text:
        return {}
    overrides, depth, current = {}, 0, ""
    parts = []
    for char in text:  # split on commas outside brackets
        depth += char in "[{" and 1 or 0
        depth -= char in "]}" and 1 or 0
        if char == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += char
    parts.append(current)
    for part in filter(None, (p.strip() for p in parts)):
        if "=" not in part:
            raise ValueError(f"--config_overrides entry {part!r} is not key=value")
        key, value = part.split("=", 1)
        try:
            overrides[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            overrides[key.strip()] = value
    return overrides


# --------------------------------------------------------------------------------------------- data


class EpochSampler(Sampler):
    """Yields `(epoch, index)` in an order shuffled from (seed, epoch); `set_epoch` moves to the next epoch."""

    def __init__(self, num_samples: int, seed: int, shuffle: bool = True):
        self.num_samples, self.seed, self.shuffle, self.epoch = num_samples, seed, shuffle, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        if self.shuffle:
            order = torch.randperm(self.num_samples, generator=torch.Generator().manual_seed(self.seed + self.epoch))
        else:
            order = torch.arange(self.num_samples)
        return iter([(self.epoch, int(i)) for i in order])

    def __len__(self) -> int:
        return self.num_samples


class MaskedImageDataset(TorchDataset):
    """Map-style: `(epoch, index)` -> augmented image and its FCMAE mask, both seeded per sample."""

    def __init__(self, dataset, image_column: str, transform, draw_mask, seed: int):
        self.dataset, self.image_column, self.transform, self.draw_mask, self.seed = (
            dataset, image_column, transform, draw_mask, seed)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key):
        from .data import open_image
        from .transforms import sample_generator

        epoch, index = key
        generator = sample_generator(self.seed, epoch, index)
        pixel_values = self.transform(open_image(self.dataset[index][self.image_column]), generator)
        return {"pixel_values": pixel_values, "bool_masked_pos": self.draw_mask(pixel_values, generator)}


class StreamingMaskedImageDataset(TorchIterableDataset):
    """Streaming: the running position in the stream plays the role of the index."""

    def __init__(self, dataset, image_column: str, transform, draw_mask, seed: int):
        self.dataset, self.image_column, self.transform, self.draw_mask, self.seed = (
            dataset, image_column, transform, draw_mask, seed)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        from .data import open_image
        from .transforms import sample_generator

        stream = self.dataset.shuffle(seed=self.seed + self.epoch, buffer_size=1000)
        for position, row in enumerate(stream):
            generator = sample_generator(self.seed, self.epoch, position)
            pixel_values = self.transform(open_image(row[self.image_column]), generator)
            yield {"pixel_values": pixel_values, "bool_masked_pos": self.draw_mask(pixel_values, generator)}


def collate(examples):
    return {
        "pixel_values": torch.stack([e["pixel_values"] for e in examples]),
        "bool_masked_pos": torch.stack([e["bool_masked_pos"] for e in examples]),
    }


# --------------------------------------------------------------------------------------------- checkpoints


def save_checkpoint_atomically(accelerator, output_dir: str, name: str, state: dict) -> str:
    """`accelerator.save_state` into a temporary folder, then rename: a crash never leaves a half checkpoint."""
    final = os.path.join(output_dir, name)
    tmp = os.path.join(output_dir, f".tmp-{name}")
    if accelerator.is_main_process and os.path.exists(tmp):
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(tmp)
    if accelerator.is_main_process:
        with open(os.path.join(tmp, "training_state.json"), "w") as handle:
            json.dump(state, handle)
        if os.path.exists(final):
            shutil.rmtree(final)
        os.replace(tmp, final)
    accelerator.wait_for_everyone()
    return final


def find_checkpoint(output_dir: str, requested: str) -> str:
    if requested != "latest":
        if not os.path.isdir(requested):
            raise FileNotFoundError(f"--resume_from_checkpoint {requested!r} is not a folder.")
        return requested
    found = [d for d in Path(output_dir).glob("checkpoint-*") if (d / "training_state.json").exists()]
    if not found:
        raise FileNotFoundError(f"No complete checkpoint-* folder in {output_dir} to resume from.")
    return str(max(found, key=lambda d: json.loads((d / "training_state.json").read_text())["completed_steps"]))


# --------------------------------------------------------------------------------------------- main


def use_cpu_processes() -> bool:
    """Several processes but no CUDA (e.g. `accelerate launch --multi_gpu --num_processes 2` on a CPU machine):
    run them as CPU data parallelism over gloo instead of as independent single-process runs."""
    if os.environ.get("ACCELERATE_USE_CPU", "false").lower() in ("1", "true"):
        return True
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()


def build_model_and_processor(args):
    from . import ConvNextV2Config, ConvNextV2ForMaskedImageModeling, ConvNextV2ImageProcessor

    overrides = parse_config_overrides(args.config_overrides)
    for name in ("mask_ratio", "sparse_backend", "sparse_grn_scope", "mask_strategy"):
        if getattr(args, name, None) is not None:
            overrides[name] = getattr(args, name)
    if args.norm_pix_loss:
        overrides["norm_pix_loss"] = True
    if args.model_name_or_path:
        config = ConvNextV2Config.from_pretrained(args.model_name_or_path, **overrides)
        model = ConvNextV2ForMaskedImageModeling.from_pretrained(args.model_name_or_path, config=config)
    else:
        config = ConvNextV2Config.from_preset(args.model_preset, image_size=args.image_size, **overrides)
        model = ConvNextV2ForMaskedImageModeling(config)
    cell = config.mask_cell_size
    if args.image_size % cell:
        raise ValueError(f"--image_size {args.image_size} must be a multiple of the mask cell ({cell} px).")
    processor = ConvNextV2ImageProcessor.for_training(
        args.image_processor_name or args.model_name_or_path, args.image_size, cell, config.mask_ratio)
    return model, processor


def preview_batch(dataset, image_column: str, processor, count: int = 8) -> torch.Tensor:
    """A few images center-cropped by the processor, for the reconstruction picture."""
    from .data import open_image

    if hasattr(dataset, "__len__"):  # evenly spread over the dataset, so that several classes show
        step = max(1, len(dataset) // count)
        rows = (dataset[i] for i in range(0, min(len(dataset), step * count), step))
    else:
        rows = dataset.take(count)
    images = [open_image(row[image_column]) for row in rows]
    return processor(images, return_tensors="pt")["pixel_values"]


def main(argv: list[str] | None = None) -> dict:
    """Run pre-training; returns a summary (final loss, steps, paths)."""
    args = build_parser().parse_args(argv)
    return run(args)


def run(args: argparse.Namespace) -> dict:
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from tqdm.auto import tqdm
    from transformers import get_scheduler

    from . import data as data_utils
    from .hub import ensure_hub_available, push_folder_to_hub
    from .model_card import CardInfo, save_model_card
    from .optim import param_groups
    from .plots import save_curves, save_reconstruction_grid
    from .transforms import PretrainTransform

    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    if args.push_to_hub:  # fail before any work
        ensure_hub_available("push the pre-trained model (--push_to_hub)", args.hub_token)
    if args.streaming and args.max_train_steps is None:
        raise ValueError("--streaming needs --max_train_steps (a stream has no length to count epochs by).")
    if (os.path.isdir(args.output_dir) and any(Path(args.output_dir).glob("*.safetensors"))
            and not args.overwrite_output_dir and not args.resume_from_checkpoint):
        raise ValueError(f"{args.output_dir} already holds a model; pass --overwrite_output_dir or --resume_from_checkpoint.")

    accelerator = Accelerator(
        cpu=use_cpu_processes(),
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=args.report_to if args.with_tracking else None,
        project_dir=args.output_dir,
    )
    set_seed(args.seed)
    os.makedirs(args.output_dir, exist_ok=True)

    raw = data_utils.load_image_dataset(args.dataset_name, args.dataset_config_name, args.train_dir,
                                        args.validation_dir, args.streaming, args.cache_dir, args.hub_token)
    if "train" not in raw:
        raise ValueError(f"The dataset has no train split (splits: {list(raw)}).")
    train = raw["train"]
    image_column = data_utils.find_column(train, args.image_column_name, data_utils.IMAGE_COLUMN_CANDIDATES, "image")
    train = data_utils.undecoded(train, image_column)
    if args.max_train_samples is not None:
        train = train.take(args.max_train_samples) if args.streaming else train.select(range(min(args.max_train_samples, len(train))))
    skipped = None
    if args.skip_corrupt_images:
        with accelerator.main_process_first():
            train, skipped = data_utils.drop_unreadable(train, image_column)
        if skipped:
            logger.warning("Skipped %d unreadable image(s).", skipped)
    data_utils.check_not_empty(train, "train")

    model, processor = build_model_and_processor(args)
    config = model.config
    transform = PretrainTransform(args.image_size, processor.image_mean, processor.image_std,
                                  scale=(args.crop_min_scale, 1.0))
    grid = (args.image_size // config.mask_cell_size,) * 2

    def draw_mask(pixel_values, generator):
        seed = int(torch.randint(0, 2**31 - 1, (1,), generator=generator))
        mask = processor.draw_masks([tuple(pixel_values.shape[-2:])], config.mask_ratio, config.mask_cell_size, seed)
        return torch.as_tensor(mask[0])

    if args.streaming:
        train_dataset = StreamingMaskedImageDataset(train, image_column, transform, draw_mask, args.seed)
        dataloader = DataLoader(train_dataset, batch_size=args.per_device_train_batch_size, collate_fn=collate,
                                num_workers=args.dataloader_num_workers)
        sampler = None
    else:
        train_dataset = MaskedImageDataset(train, image_column, transform, draw_mask, args.seed)
        sampler = EpochSampler(len(train_dataset), args.seed)
        dataloader = DataLoader(train_dataset, batch_size=args.per_device_train_batch_size, sampler=sampler,
                                collate_fn=collate, num_workers=args.dataloader_num_workers, drop_last=True)
        if len(dataloader) == 0:
            raise ValueError(f"{len(train_dataset)} training images are fewer than one batch of "
                             f"{args.per_device_train_batch_size}; lower --per_device_train_batch_size.")

    total_batch = args.per_device_train_batch_size * accelerator.num_processes * args.gradient_accumulation_steps
    learning_rate = args.learning_rate or args.base_learning_rate * total_batch / 256
    optimizer = torch.optim.AdamW(
        [{k: v for k, v in g.items() if k != "names"} for g in param_groups(model, args.weight_decay)],
        lr=learning_rate, betas=(args.adam_beta1, args.adam_beta2),
    )
    model, optimizer, dataloader = accelerator.prepare(model, optimizer, dataloader)

    if args.streaming:
        steps_per_epoch = None
        max_train_steps = args.max_train_steps
        num_epochs = 10**9
    else:
        steps_per_epoch = math.ceil(len(dataloader) / args.gradient_accumulation_steps)
        max_train_steps = args.max_train_steps or math.ceil(args.num_train_epochs * steps_per_epoch)
        num_epochs = math.ceil(max_train_steps / steps_per_epoch)
    warmup = args.num_warmup_steps
    if warmup is None:
        warmup = int(args.warmup_epochs * steps_per_epoch) if steps_per_epoch else 0
    warmup = min(warmup, max_train_steps)
    scheduler = get_scheduler(args.lr_scheduler_type, optimizer,
                              num_warmup_steps=warmup * accelerator.num_processes,
                              num_training_steps=max_train_steps * accelerator.num_processes)
    scheduler = accelerator.prepare(scheduler)
    checkpoint_every = args.checkpointing_steps
    if checkpoint_every is not None and checkpoint_every != "epoch":
        checkpoint_every = int(checkpoint_every)

    if args.with_tracking:
        accelerator.init_trackers("fcmae", {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool))})

    completed_steps, start_epoch, resume_batches, history = 0, 0, 0, []
    if args.resume_from_checkpoint:
        path = find_checkpoint(args.output_dir, args.resume_from_checkpoint)
        accelerator.load_state(path)
        state = json.loads(Path(path, "training_state.json").read_text())
        completed_steps, history = state["completed_steps"], state["history"]
        if steps_per_epoch:
            start_epoch = completed_steps // steps_per_epoch
            resume_batches = (completed_steps % steps_per_epoch) * args.gradient_accumulation_steps
        accelerator.print(f"Resumed from {path} at step {completed_steps}")

    accelerator.print(
        f"FCMAE pre-training: {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters, "
        f"{max_train_steps} steps, total batch {total_batch}, lr {learning_rate:.2e}, mask ratio {config.mask_ratio}"
    )
    progress = tqdm(range(max_train_steps), initial=completed_steps, disable=not accelerator.is_local_main_process,
                    desc="FCMAE pre-training")
    running, seen = 0.0, 0
    for epoch in range(start_epoch, num_epochs):
        if completed_steps >= max_train_steps:
            break
        model.train()
        if sampler is None:
            train_dataset.set_epoch(epoch)
        dataloader.set_epoch(epoch)  # the prepared loader would otherwise count epochs from 0 after a resume
        batches = dataloader
        if resume_batches and epoch == start_epoch:
            batches = accelerator.skip_first_batches(dataloader, resume_batches)
            batches.set_epoch(epoch)
        if sampler is not None:
            sampler.set_epoch(epoch)
        for batch in batches:
            with accelerator.accumulate(model):
                loss = model(**batch).loss
                accelerator.backward(loss)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()
            running += accelerator.gather(loss.detach().float()).mean().item()
            seen += 1
            if not accelerator.sync_gradients:
                continue
            completed_steps += 1
            step_loss, running, seen = running / seen, 0.0, 0
            history.append([completed_steps, step_loss])
            progress.update(1)
            progress.set_postfix(loss=f"{step_loss:.4f}")
            if args.with_tracking and completed_steps % args.logging_steps == 0:
                accelerator.log({"train_loss": step_loss, "lr": scheduler.get_last_lr()[0]}, step=completed_steps)
            if isinstance(checkpoint_every, int) and completed_steps % checkpoint_every == 0:
                save_checkpoint_atomically(accelerator, args.output_dir, f"checkpoint-{completed_steps}",
                                           {"completed_steps": completed_steps, "history": history})
            if completed_steps >= max_train_steps:
                break
        if checkpoint_every == "epoch":
            save_checkpoint_atomically(accelerator, args.output_dir, f"checkpoint-{completed_steps}",
                                       {"completed_steps": completed_steps, "history": history})
    progress.close()
    if args.with_tracking:
        accelerator.end_training()

    summary = {"completed_steps": completed_steps, "history": history,
               "final_loss": history[-1][1] if history else None, "skipped_images": skipped}
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        unwrapped = accelerator.unwrap_model(model)
        unwrapped.save_pretrained(args.output_dir)
        processor.save_pretrained(args.output_dir)
        steps, losses = zip(*history) if history else ((), ())
        plots = {}
        save_curves({"train": (list(steps), list(losses))}, os.path.join(args.output_dir, "loss_curve.png"),
                    "FCMAE pre-training loss")
        plots["Pre-training loss"] = "loss_curve.png"
        preview = preview_batch(train, image_column, processor).to(accelerator.device)
        generator = torch.Generator().manual_seed(args.seed)
        from .masking import random_masking

        preview_mask = random_masking(preview.shape[0], grid, config.mask_ratio, generator=generator).to(preview.device)
        save_reconstruction_grid(unwrapped, preview, os.path.join(args.output_dir, "reconstructions.png"),
                                 processor.image_mean, processor.image_std, bool_masked_pos=preview_mask)
        plots["Reconstructions (input, masked, reconstruction)"] = "reconstructions.png"
        tail = [loss for _, loss in history[-max(1, len(history) // 10):]]
        results = {"final training loss (mean of last 10% of steps)": f"{sum(tail) / len(tail):.4f}"} if tail else {}
        data_text = (f"`{args.dataset_name}`" if args.dataset_name else f"images from the `{Path(args.train_dir).name}` folder") + (
            f", {len(train)} training images" if not args.streaming else " (streamed)")
        info = CardInfo(
            model_name=args.hub_model_id or Path(args.output_dir).name,
            summary="ConvNeXt V2 pre-trained without labels by FCMAE (fully convolutional masked autoencoder).",
            data=data_text,
            recipe={"steps": str(completed_steps), "total batch": str(total_batch), "learning rate": f"{learning_rate:.3g}",
                    "schedule": f"{args.lr_scheduler_type}, {warmup} warm-up steps", "optimizer": (
                        f"AdamW ({args.adam_beta1}, {args.adam_beta2}), weight decay {args.weight_decay}"),
                    "mask ratio": str(config.mask_ratio), "image size": str(args.image_size),
                    "norm_pix_loss": str(config.norm_pix_loss), "augmentation": (
                        f"RandomResizedCrop(scale {args.crop_min_scale}-1.0) + horizontal flip")},
            results=results, plots=plots,
            datasets=[args.dataset_name] if args.dataset_name else None,
        )
        save_model_card(unwrapped, info, args.output_dir)
        with open(os.path.join(args.output_dir, "train_results.json"), "w") as handle:
            json.dump({k: v for k, v in summary.items() if k != "history"} | {"loss_history": history}, handle)
        if args.push_to_hub:
            push_folder_to_hub(args.output_dir, args.hub_model_id or Path(args.output_dir).name, args.hub_token)
    accelerator.wait_for_everyone()
    return summary
