"""The FCMAE pre-training loop on Accelerate: the step plan, resume position, one epoch, validation, checkpoints.

Kept apart from the entry point so that the arithmetic (steps per epoch, warm-up, where a resumed run picks up) can
be tested on its own.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..data.transforms import normalize_pixels
from ...outputs.staging import PRETRAINING_MARKER, failed_write_kept_out, publish, shared_staging
from ..checkpoints import (
    check_finite_loss, check_same_model, find_checkpoint, read_training_state, rotate_checkpoints)
from ...outputs.staging import checkpoint_step

logger = logging.getLogger(__name__)


@dataclass
class TrainingPlan:
    """How long to train and how fast: derived from the arguments and the size of one process's data loader."""

    total_batch: int
    learning_rate: float
    steps_per_epoch: int | None  # None when streaming
    max_train_steps: int
    num_epochs: int
    warmup_steps: int
    checkpoint_every: int | str | None

    @staticmethod
    def total_batch_for(args, num_processes: int) -> int:
        return args.per_device_train_batch_size * num_processes * args.gradient_accumulation_steps

    @classmethod
    def learning_rate_for(cls, args, num_processes: int) -> float:
        """`--learning_rate` if given, else the reference scaling `base_learning_rate * total batch / 256`."""
        if args.learning_rate is not None:
            return args.learning_rate
        return args.base_learning_rate * cls.total_batch_for(args, num_processes) / 256

    @classmethod
    def from_args(cls, args, num_batches: int | None, num_processes: int) -> "TrainingPlan":
        """`num_batches`: batches per epoch in one process's loader (None when streaming)."""
        total_batch = cls.total_batch_for(args, num_processes)
        learning_rate = cls.learning_rate_for(args, num_processes)
        if num_batches is None:
            steps_per_epoch, max_steps, num_epochs = None, args.max_train_steps, 10**9
        else:
            steps_per_epoch = math.ceil(num_batches / args.gradient_accumulation_steps)
            max_steps = (args.max_train_steps if args.max_train_steps is not None
                         else math.ceil(args.num_train_epochs * steps_per_epoch))
            num_epochs = math.ceil(max_steps / steps_per_epoch)
        warmup = args.num_warmup_steps
        if warmup is None:
            warmup = int(args.warmup_epochs * steps_per_epoch) if steps_per_epoch else 0
        every = args.checkpointing_steps
        every = int(every) if every is not None and every != "epoch" else every
        return cls(total_batch, learning_rate, steps_per_epoch, max_steps, num_epochs, min(warmup, max_steps), every)

    def resume_position(self, completed_steps: int, gradient_accumulation_steps: int) -> tuple[int, int]:
        """(epoch to continue in, loader batches of that epoch already consumed) after `completed_steps`."""
        if not self.steps_per_epoch:
            return 0, 0
        epoch = completed_steps // self.steps_per_epoch
        return epoch, (completed_steps % self.steps_per_epoch) * gradient_accumulation_steps


@dataclass
class TrainingState:
    """What a checkpoint records besides the weights: the steps done and the loss history."""

    completed_steps: int = 0
    history: list[list[float]] = field(default_factory=list)  # [step, mean training loss]
    validation: list[list[float]] = field(default_factory=list)  # [step, validation loss]
    stream: list[list[int]] | None = None  # streaming: per process, [epoch, last row used from each worker]

    def to_dict(self) -> dict:
        saved = {"completed_steps": self.completed_steps, "history": self.history, "validation": self.validation}
        return saved | ({"stream": self.stream} if self.stream is not None else {})


@dataclass
class FCMAERun:
    """Everything one pre-training run holds; built by `convnextv2_hf.training.pretrain`."""

    accelerator: Any
    model: Any
    optimizer: Any
    scheduler: Any
    train_loader: Any
    train_dataset: Any
    sampler: Any
    plan: TrainingPlan
    args: Any
    eval_loader: Any = None
    progress: Any = None
    pixel_stats: tuple | None = None  # (mean, std) on the device, for uint8 batches
    cuda_graphs: bool = False  # `--torch_compile_mode reduce-overhead`: gradient buffers kept (`keep_gradient_buffers`)
    cuda_graphs_checked: bool = False  # whether `say_if_cuda_graphs_left_out` has looked (after the first step)


def normalized(run: FCMAERun, batch: dict) -> dict:
    """A batch of uint8 pixels from the loader, normalised on its device with tensors made once."""
    pixels = batch["pixel_values"]
    if pixels.dtype != torch.uint8:
        return batch
    if run.pixel_stats is None:
        raise ValueError("uint8 pixel batches need the processor's image_mean and image_std (FCMAERun.pixel_stats).")
    return {**batch, "pixel_values": normalize_pixels(pixels, *run.pixel_stats)}


def epoch_batches(run: FCMAERun, epoch: int, skip: int):
    """The loader for `epoch`, with its first `skip` batches left out when resuming in the middle of it."""
    if run.sampler is None:  # streaming: each process reads its own part; the loader is not Accelerate's
        run.train_dataset.set_epoch(epoch)
        return streamed_batches(run)
    run.sampler.set_epoch(epoch)
    run.train_loader.set_epoch(epoch)  # the prepared loader would otherwise count epochs from 0 after a resume
    if not skip:
        return run.train_loader
    batches = run.accelerator.skip_first_batches(run.train_loader, skip)
    batches.set_epoch(epoch)
    return batches


def streamed_batches(run: FCMAERun):
    """This process's streamed batches on its device, each batch's rows noted as used (for an exact resume)."""
    device, resumed, batches = run.accelerator.device, bool(run.train_dataset.resume_after), 0
    for batches, batch in enumerate(run.train_loader, 1):
        run.train_dataset.record(batch.pop("stream_position"))
        yield {key: value.to(device, non_blocking=True) if torch.is_tensor(value) else value
               for key, value in batch.items()}
    if batches == 0 and not resumed:
        raise ValueError(f"This process's part of the training stream holds no readable image (process "
                         f"{run.accelerator.process_index} of {run.accelerator.num_processes}); check the data, or "
                         "give at least as many shards as processes.")


def stream_progress(run: FCMAERun) -> list[list[int]]:
    """Every process's [epoch, last row used from each of its workers], gathered for a checkpoint."""
    mine = torch.tensor([run.train_dataset.progress(run.train_loader.num_workers)], device=run.accelerator.device)
    return run.accelerator.gather(mine).tolist()


def train_one_epoch(run: FCMAERun, epoch: int, state: TrainingState, skip: int = 0) -> None:
    """Optimizer steps over one epoch (or until the plan's last step), logging and checkpointing as asked.

    Nothing here waits for the GPU: each step's loss stays on the device until a logging step, a checkpoint or the
    epoch's end reads the steps since the last read at once (and stops on a non-finite one before anything is
    saved)."""
    accelerator, running, seen, pending = run.accelerator, None, 0, []
    run.model.train()
    for batch in epoch_batches(run, epoch, skip):
        batch = normalized(run, batch)
        with accelerator.accumulate(run.model):
            loss = run.model(**batch).loss
            accelerator.backward(loss)
            run.optimizer.step()
            run.scheduler.step()
            run.optimizer.zero_grad(set_to_none=not run.cuda_graphs)
        gathered = accelerator.gather(loss.detach().float().reshape(1)).mean()
        running, seen = gathered if running is None else running + gathered, seen + 1
        if not accelerator.sync_gradients:
            continue
        state.completed_steps += 1
        pending.append(running / seen)
        running, seen = None, 0
        after_step(run, state, pending)
        if state.completed_steps >= run.plan.max_train_steps:
            break
    read_losses(run, state, pending)


def keep_gradient_buffers(model: torch.nn.Module) -> None:
    """Give every trainable parameter a zeroed `.grad` now, to be zeroed in place after each optimizer step.

    Under CUDA graphs (`--torch_compile_mode reduce-overhead`) a gradient first made inside the captured backward
    lives in the graph's memory, which the next replay writes over: with gradient accumulation torch stops the run
    ("accessing gradient tensor output of CUDAGraphs that has been overwritten"). Buffers made outside the graph
    are accumulated into instead."""
    for parameter in model.parameters():
        if parameter.requires_grad and parameter.grad is None:
            parameter.grad = torch.zeros_like(parameter)


def say_if_cuda_graphs_left_out(run: FCMAERun) -> None:
    """Once, after the first step in `--torch_compile_mode reduce-overhead`: inductor leaves CUDA graphs out without
    a word (always on a CPU; on a GPU for a graph it cannot capture), and the run is then only compiled."""
    from torch._dynamo.utils import counters

    run.cuda_graphs_checked = True
    skipped = counters["inductor"]["cudagraph_skips"]
    if skipped and run.accelerator.is_main_process:
        device = run.accelerator.device.type
        why = "TORCH_LOGS=cudagraphs names the reason" if device == "cuda" else "they exist only on CUDA"
        logger.warning("--torch_compile_mode reduce-overhead asked for CUDA graphs, but inductor left them out of %d "
                       "compiled graph(s) on %s (%s); the run goes on compiled, without them.", skipped, device, why)


def after_step(run: FCMAERun, state: TrainingState, pending: list) -> None:
    if run.progress is not None:
        run.progress.update(1)
    if run.cuda_graphs and not run.cuda_graphs_checked:
        say_if_cuda_graphs_left_out(run)
    every = run.plan.checkpoint_every
    checkpoint_now = isinstance(every, int) and state.completed_steps % every == 0
    if checkpoint_now or state.completed_steps % run.args.logging_steps == 0:
        read_losses(run, state, pending)
    if checkpoint_now:
        save_checkpoint(run, state)


def read_losses(run: FCMAERun, state: TrainingState, pending: list) -> None:
    """Bring the losses of the steps since the last read to the host (one wait for the device), stop on a
    non-finite one, record them in the history, the progress bar and the tracker."""
    if not pending:
        return
    first = state.completed_steps - len(pending) + 1
    values = torch.stack(pending).tolist()
    pending.clear()
    for step, value in enumerate(values, first):
        check_finite_loss(value, step, run.args.output_dir, PRETRAINING_MARKER)
        state.history.append([step, value])
        if run.args.with_tracking and step % run.args.logging_steps == 0:
            run.accelerator.log({"train_loss": value, "lr": run.scheduler.get_last_lr()[0]}, step=step)
    if run.progress is not None:
        run.progress.set_postfix(loss=f"{values[-1]:.4f}")


@torch.no_grad()
def evaluate(run: FCMAERun) -> float:
    """Mean masked-reconstruction loss over the validation split (fixed masks, center crops)."""
    run.model.eval()
    losses = [run.accelerator.gather(run.model(**batch).loss.detach().float().reshape(1)).mean()
              for batch in run.eval_loader]
    run.model.train()
    return torch.stack(losses).mean().item() if losses else 0.0


def save_checkpoint(run: FCMAERun, state: TrainingState) -> str:
    """`accelerator.save_state` into a staging folder, the state JSON last, then rename; then rotate old ones."""
    accelerator, output_dir = run.accelerator, run.args.output_dir
    final = Path(output_dir, f"checkpoint-{state.completed_steps}")
    if run.sampler is None:
        state.stream = stream_progress(run)
    staged = shared_staging(accelerator, output_dir, final.name, accelerator.is_main_process)
    with failed_write_kept_out(staged, f"checkpoint-{state.completed_steps}", output_dir, PRETRAINING_MARKER):
        accelerator.save_state(str(staged))
        accelerator.wait_for_everyone()  # each process writes its own files (RNG state, FSDP shards) before the rename
        if accelerator.is_main_process:
            Path(staged, PRETRAINING_MARKER).write_text(json.dumps(state.to_dict()))
            publish(staged, final)
    if accelerator.is_main_process:
        rotate_checkpoints(output_dir, run.args.checkpoints_total_limit, PRETRAINING_MARKER)
    accelerator.wait_for_everyone()
    return str(final)


def resume(run: FCMAERun, requested: str) -> TrainingState:
    """Load the weights, optimizer, scheduler and RNG states of a checkpoint; returns its training state."""
    path = find_checkpoint(run.args.output_dir, requested)
    check_same_model(path, run.accelerator.unwrap_model(run.model, keep_torch_compile=False))
    check_same_processes(path, run.accelerator.num_processes)
    run.accelerator.load_state(path)
    saved = read_training_state(path)
    state = TrainingState(saved["completed_steps"], saved["history"], saved.get("validation", []), saved.get("stream"))
    if run.sampler is None:
        resume_stream(run, state)
    run.accelerator.print(f"Resumed from {path} at step {state.completed_steps} (checkpoint-{checkpoint_step(path)})")
    return state


def check_same_processes(checkpoint: str, processes: int) -> None:
    """A run resumes on as many processes as wrote its checkpoint (one RNG state file each): on another number the
    batches per step, and with them the data order and the learning-rate schedule, would follow neither run."""
    saved = len(list(Path(checkpoint).glob("random_states_*.pkl")))
    if saved and saved != processes:
        raise ValueError(f"--resume_from_checkpoint {checkpoint} was written by {saved} process(es), this run has "
                         f"{processes}; resume with the same number of processes (accelerate launch --num_processes "
                         f"{saved}), or start a new --output_dir.")


def resume_stream(run: FCMAERun, state: TrainingState) -> None:
    """A streamed run continues at the row after the last one its checkpoint had used, per process and worker."""
    processes = run.accelerator.num_processes
    if state.stream is None or len(state.stream) != processes:
        saved = "without stream positions" if state.stream is None else f"by {len(state.stream)} process(es)"
        raise ValueError(f"The checkpoint was written {saved}; resume a streamed run with the same data and number of "
                         f"processes it was saved with (now {processes}).")
    run.train_dataset.resume_at(state.stream[run.accelerator.process_index], run.train_loader.num_workers)


def train(run: FCMAERun, state: TrainingState) -> TrainingState:
    """Epochs until the plan's last step; validation loss after each epoch when there is a validation split."""
    start_epoch, skip = run.plan.resume_position(state.completed_steps, run.args.gradient_accumulation_steps)
    if run.sampler is None:  # streaming: the epoch this process's stream was in
        start_epoch = run.train_dataset.epoch
    if missed_validation(run, state, skip):  # killed between the epoch's last checkpoint and its validation
        validate(run, state, start_epoch if skip == 0 else start_epoch + 1)
    for epoch in range(start_epoch, run.plan.num_epochs):
        if state.completed_steps >= run.plan.max_train_steps:
            break
        train_one_epoch(run, epoch, state, skip if epoch == start_epoch else 0)
        if run.eval_loader is not None:
            validate(run, state, epoch + 1)
        if run.plan.checkpoint_every == "epoch":
            save_checkpoint(run, state)
    return state


def missed_validation(run: FCMAERun, state: TrainingState, skip: int) -> bool:
    """Whether a resumed run starts where an epoch (or the run) ended but that epoch's validation loss is missing."""
    at_an_end = (skip == 0 and bool(run.plan.steps_per_epoch)) or state.completed_steps >= run.plan.max_train_steps
    done = any(step == state.completed_steps for step, _ in state.validation)
    return run.eval_loader is not None and state.completed_steps > 0 and at_an_end and not done


def validate(run: FCMAERun, state: TrainingState, epoch: int) -> None:
    """Record (and log) the validation loss after `epoch` (counted from 1)."""
    loss = evaluate(run)
    state.validation.append([state.completed_steps, loss])
    run.accelerator.print(f"epoch {epoch}: validation loss {loss:.4f}")
    if run.args.with_tracking:
        run.accelerator.log({"validation_loss": loss}, step=state.completed_steps)
