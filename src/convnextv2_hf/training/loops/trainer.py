"""The fine-tuning `Trainer`: checkpoints as crash-safe as pre-training's, with the EMA weights inside them.

A checkpoint is written into a staging folder and renamed, so `checkpoint-N` exists only when complete; old ones are
rotated away only after that; a full disk is reported in one line with the newest complete checkpoint intact.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from transformers import Trainer, TrainerCallback

from ...outputs.manifest import remove_ours
from ...outputs.staging import TRAINER_MARKER, failed_write_kept_out, publish, shared_staging
from ..checkpoints import check_finite_loss, rotate_checkpoints
from ..data.labelled_streams import StreamedEvaluationDataset
from ..data.streams import ResumableStream
from .ema import ModelEMA
from .optim import create_optimizer

EMA_WEIGHTS = "ema.safetensors"
STREAM_POSITIONS = "stream_positions.json"  # per process: the part of the next batch, (epoch, last row) per part


class EMACallback(TrainerCallback):
    """Exponential moving average of the weights (the reference's `--model_ema`), updated after every optimizer
    step; saved inside every checkpoint and restored with it."""

    def __init__(self, model, decay: float):
        self.ema = ModelEMA(model, decay)

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        """The Trainer moves the model to its device after this callback was made: the average follows it there,
        so each update is a few fused device ops instead of a copy of every weight to the CPU."""
        device = next(model.parameters()).device
        if next(self.ema.parameters()).device != device:
            self.ema.to(device)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.ema.update(model)

    def save(self, folder: str | os.PathLike) -> None:
        save_file({k: v.detach().contiguous() for k, v in self.ema.state_dict().items()}, str(Path(folder, EMA_WEIGHTS)))

    def load(self, folder: str | os.PathLike) -> None:
        path = Path(folder, EMA_WEIGHTS)
        if not path.is_file():
            raise FileNotFoundError(f"{folder} holds no EMA weights ({EMA_WEIGHTS}); it was written without --model_ema.")
        self.ema.load_state_dict(load_file(str(path)))


class EpochCallback(TrainerCallback):
    """Tells a dataset with `set_epoch` which epoch is starting, so per-sample augmentation can be seeded by it."""

    def __init__(self, dataset):
        self.dataset = dataset

    def on_epoch_begin(self, args, state, control, **kwargs):
        self.dataset.set_epoch(int(state.epoch + 1e-9))


class PassCallback(TrainerCallback):
    """A streamed run is one `Trainer` epoch of `max_steps`: its logs count passes over the data instead."""

    def __init__(self, steps_per_pass: int):
        self.steps_per_pass = steps_per_pass

    def on_step_end(self, args, state, control, **kwargs):
        state.epoch = state.global_step / self.steps_per_pass


class CrashSafeCheckpoints:
    """Mixin for `Trainer` classes: staged, renamed checkpoints with the EMA weights inside."""

    ema: EMACallback | None = None

    def _save_checkpoint(self, model, trial) -> None:
        run_dir, name = self._get_output_dir(trial=trial), f"checkpoint-{self.state.global_step}"
        staging = shared_staging(self.accelerator, run_dir, "trainer", self.args.should_save)
        output_dir, limit = self.args.output_dir, self.args.save_total_limit
        with failed_write_kept_out(staging, name, run_dir, TRAINER_MARKER):
            self.args.output_dir, self.args.save_total_limit = str(staging), None  # the Trainer writes here
            try:
                super()._save_checkpoint(model, trial)
            finally:
                self.args.output_dir, self.args.save_total_limit = output_dir, limit
            extras = self.checkpoint_extras()  # every process: may gather
            if self.args.should_save:
                self._finish_staged(staging / name, Path(run_dir, name), extras)
        self.accelerator.wait_for_everyone()
        if self.args.should_save:
            rotate_checkpoints(run_dir, limit, TRAINER_MARKER, protect=self.state.best_model_checkpoint)

    def checkpoint_extras(self) -> dict[str, object]:
        """JSON files to write into each checkpoint besides the Trainer's own (file name -> content)."""
        return {}

    def _finish_staged(self, staged: Path, final: Path, extras: dict[str, object]) -> None:
        if self.ema is not None:
            self.ema.save(staged)
        for file_name, content in extras.items():
            Path(staged, file_name).write_text(json.dumps(content))
        best = self.state.best_model_checkpoint
        if best and Path(best).parent == staged.parent:  # the Trainer named the staging path as the best one
            self.state.best_model_checkpoint = str(final)
            self.state.save_to_json(str(staged / TRAINER_MARKER))
        publish(staged, final)
        if not any(staged.parent.iterdir()):
            remove_ours(staged.parent)


class StopsOnNonFiniteLoss:
    """Mixin for `Trainer` classes: a NaN or infinite loss (in any process) stops training before the optimizer
    applies that step, instead of saving a model of NaNs."""

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        check_finite_loss(self.accelerator.gather(loss.detach().float().reshape(1)), self.state.global_step + 1,
                          self.args.output_dir, TRAINER_MARKER)
        return loss


class StreamedTrainingData:
    """Mixin for `Trainer` classes: a streamed training set ([`ResumableStream`]) is read by each process's own
    loader (its own parts of the stream; Accelerate's would read it all in one process and send it out), each
    batch's rows are noted, and every checkpoint records where each process's stream stands."""

    def get_train_dataloader(self):
        if not isinstance(self.train_dataset, ResumableStream):
            return super().get_train_dataloader()
        from torch.utils.data import DataLoader

        workers = self.args.dataloader_num_workers
        # its own generator: starting the loader (as a resumed run does after restoring the RNG state) must not draw
        # from the global one, which drop path uses (the samples are seeded apart)
        return DataLoader(self.train_dataset, batch_size=self._train_batch_size, collate_fn=self.data_collator,
                          num_workers=workers, pin_memory=self.args.dataloader_pin_memory,
                          prefetch_factor=self.args.dataloader_prefetch_factor if workers else None,
                          generator=torch.Generator().manual_seed(self.args.seed))

    def training_step(self, model, inputs, num_items_in_batch=None):
        positions = inputs.pop("stream_position", None)
        if positions is not None:
            self.train_dataset.record(positions)
        return super().training_step(model, inputs, num_items_in_batch)

    def checkpoint_extras(self) -> dict[str, object]:
        extras = super().checkpoint_extras()
        if isinstance(self.train_dataset, ResumableStream):
            mine = torch.tensor([self.train_dataset.progress(self.args.dataloader_num_workers)], device=self.args.device)
            extras[STREAM_POSITIONS] = self.accelerator.gather(mine).tolist()
        return extras

    def resume_stream(self, checkpoint: str | os.PathLike) -> None:
        """Continue each process's stream after the last row its checkpoint had used."""
        path, processes = Path(checkpoint, STREAM_POSITIONS), self.args.world_size
        saved = json.loads(path.read_text()) if path.is_file() else None
        if saved is None or len(saved) != processes:
            written = "without stream positions" if saved is None else f"by {len(saved)} process(es)"
            raise ValueError(f"--resume_from_checkpoint {checkpoint} was written {written}; resume a streamed run with "
                             f"the data and number of processes it was saved with (now {processes}).")
        self.train_dataset.resume_at(saved[self.args.process_index], self.args.dataloader_num_workers)


class StreamedEvaluation:
    """Mixin for `Trainer` classes: on several processes, each process evaluates its own part of a streamed
    evaluation set ([`StreamedEvaluationDataset`] split by process) and only the sums are reduced. Accelerate's
    loader would decode every image in the main process and send the pixels to the others (between machines, over
    the network). The loss and metrics are the Trainer's own (`prediction_step`, `compute_metrics`), averaged over
    images, which is what the accuracy metrics are."""

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict[str, float]:
        dataset = self.eval_dataset if eval_dataset is None else eval_dataset
        if self.args.world_size == 1 or not isinstance(dataset, StreamedEvaluationDataset):
            return super().evaluate(eval_dataset, ignore_keys, metric_key_prefix)
        from transformers.trainer_utils import speed_metrics

        started = time.time()
        names, sums = self.evaluated_sums(dataset, ignore_keys)
        images, *totals = self.accelerator.reduce(sums, "sum").tolist()
        metrics = {f"{metric_key_prefix}_{name}": total / max(images, 1) for name, total in zip(names, totals)}
        metrics.update(speed_metrics(metric_key_prefix, started, num_samples=int(images), num_steps=math.ceil(
            images / (self.args.eval_batch_size * self.args.world_size))))
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics

    def evaluated_sums(self, dataset, ignore_keys) -> tuple[list[str], torch.Tensor]:
        """(names, [images, loss sum, metric sums...]) over this process's part of `dataset`."""
        from torch.utils.data import DataLoader
        from transformers import EvalPrediction

        classes = self.model.config.num_labels
        names = ["loss", *self.compute_metrics(EvalPrediction(np.zeros((1, classes)), np.zeros(1, dtype=np.int64)))]
        workers = self.args.dataloader_num_workers
        loader = DataLoader(dataset, batch_size=self.args.eval_batch_size, num_workers=workers,
                            collate_fn=getattr(self, "eval_collator", None) or self.data_collator,
                            pin_memory=self.args.dataloader_pin_memory)
        sums = [0.0] * (len(names) + 1)
        self.model.eval()
        for batch in loader:
            loss, logits, labels = self.prediction_step(self.model, batch, False, ignore_keys)
            images = len(labels)
            scores = self.compute_metrics(EvalPrediction(logits.float().cpu().numpy(), labels.cpu().numpy()))
            batch_sums = [images, float(loss) * images, *(scores[name] * images for name in names[1:])]
            sums = [total + value for total, value in zip(sums, batch_sums)]
        return names, torch.tensor(sums, dtype=torch.float64, device=self.args.device)


class RecipeOptimizer:
    """The recipe's AdamW ([`create_optimizer`]: layer-wise lr decay, no weight decay on norms, biases and GRN), built
    where the Trainer builds its optimizer: under FSDP that is after the model is sharded, and an optimizer passed
    in is refused."""

    def __init__(self, *args, layer_decay: float | None = None, layer_decay_type: str = "single", **kwargs):
        self.layer_decay, self.layer_decay_type = layer_decay, layer_decay_type
        super().__init__(*args, **kwargs)

    def create_optimizer(self, model=None):
        if self.optimizer is None:
            self.optimizer = create_optimizer(self.model if model is None else model, self.args, self.layer_decay,
                                              self.layer_decay_type)
        return self.optimizer


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


class FinetuningTrainer(RecipeOptimizer, StopsOnNonFiniteLoss, StreamedTrainingData, StreamedEvaluation,
                        CrashSafeCheckpoints, Trainer):
    pass


class MixingFinetuningTrainer(RecipeOptimizer, StopsOnNonFiniteLoss, StreamedTrainingData, StreamedEvaluation,
                              CrashSafeCheckpoints, MixingTrainer):
    pass


def finished_run(checkpoint: str | os.PathLike, output_dir: str | os.PathLike, planned: int) -> dict | None:
    """The saved results, if `checkpoint` already reached the `planned` steps of this run and its results are
    written; with more steps planned (more epochs asked for) the run goes on from the checkpoint."""
    state = json.loads(Path(checkpoint, TRAINER_MARKER).read_text())
    results = Path(output_dir, "all_results.json")
    if state["global_step"] >= planned and results.is_file():
        return json.loads(results.read_text())
    return None


def planned_steps(training_args, num_samples: int) -> int:
    """The optimizer steps the Trainer will plan: `max_steps`, or epochs x update steps per epoch."""
    if training_args.max_steps > 0:
        return training_args.max_steps
    batches = -(-num_samples // (training_args.per_device_train_batch_size * training_args.world_size))
    per_epoch = max(1, batches // training_args.gradient_accumulation_steps)
    return math.ceil(training_args.num_train_epochs * per_epoch)


def total_train_batch(training_args) -> int:
    return training_args.per_device_train_batch_size * training_args.world_size * training_args.gradient_accumulation_steps


def steps_per_epoch(num_samples: int, training_args) -> int:
    return max(1, -(-num_samples // total_train_batch(training_args)))


def seed_before_the_model(training_args) -> None:
    """The Trainer seeds only when it is built, after a new head was drawn; seed first, as the reference does."""
    from transformers import set_seed

    set_seed(training_args.seed)
