"""Command-line arguments of the pre-training and fine-tuning entry points, as `HfArgumentParser` dataclasses.

`ModelArguments` and `DataArguments` are shared; `PretrainingArguments` holds the FCMAE recipe and loop settings
(defaults: the reference repository's `main_pretrain.py`), `FinetuningArguments` the recipe that fine-tuning adds to
transformers' `TrainingArguments` (defaults: the reference's `main_finetune.py`). Values are checked when built, so a
zero or negative count or rate is an error naming the flag rather than a silent fallback.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import json
import sys
from dataclasses import dataclass, field
from typing import Literal

from ..configuration_convnextv2 import CONVNEXTV2_PRESETS, FIELD_CHECKS, ConvNextV2Config
from .data.decoding import MAX_IMAGE_PIXELS


def require(condition: bool, flag: str, value, expectation: str) -> None:
    if not condition:
        raise ValueError(f"--{flag} {value!r} is invalid: it must be {expectation}.")


def check_positive(args, *names: str, allow_none: bool = True, allow_zero: bool = False) -> None:
    for name in names:
        value = getattr(args, name)
        if value is None and allow_none:
            continue
        valid = isinstance(value, (int, float)) and (value >= 0 if allow_zero else value > 0)
        require(valid, name, value, "zero or more" if allow_zero else "greater than zero")


@dataclass
class ModelArguments:
    """Which model to start from, and its size."""

    model_name_or_path: str | None = field(default=None, metadata={
        "help": "FCMAE checkpoint, ConvNeXt V2 classifier checkpoint (ours or transformers'), or none for --model_preset"})
    model_preset: str = field(default="base", metadata={
        "help": "size of a new model (the reference scripts' default is base): " + ", ".join(CONVNEXTV2_PRESETS)})
    config_overrides: str | None = field(default=None, metadata={
        "help": 'config fields for a new model, e.g. "patch_size=2,use_grn=false,depths=[1,1,3,1]"'})
    image_processor_name: str | None = field(default=None, metadata={"help": "processor folder, if not the model's"})
    image_size: int = field(default=224, metadata={"help": "training and evaluation resolution (px)"})
    cache_dir: str | None = field(default=None, metadata={"help": "where Hub models and datasets are cached"})

    def __post_init__(self):
        require(self.model_preset in CONVNEXTV2_PRESETS, "model_preset", self.model_preset,
                f"one of {', '.join(CONVNEXTV2_PRESETS)}")
        check_positive(self, "image_size", allow_none=False)
        parse_config_overrides(self.config_overrides)  # fail before any work


@dataclass
class DataArguments:
    """Where the images come from (a Hub dataset or local folders) and how unusual files are treated."""

    dataset_name: str | None = field(default=None, metadata={"help": "Hub dataset (needs network or the local cache)"})
    dataset_config_name: str | None = None
    train_dir: str | None = field(default=None, metadata={"help": "folder of images (class sub-folders for labels)"})
    train_files: list[str] | None = field(default=None, metadata={
        "help": "webdataset .tar or .parquet shards (paths or globs), streamed and shared out between processes"})
    validation_dir: str | None = field(default=None, metadata={"help": "held-out images, same layout as --train_dir"})
    validation_files: list[str] | None = field(default=None, metadata={
        "help": "validation shards (paths or globs) for fine-tuning from --train_files; evaluated streamed"})
    image_column_name: str | None = field(default=None, metadata={"help": "default: the first of image, img, ..."})
    max_train_samples: int | None = None
    skip_corrupt_images: bool = field(default=False, metadata={"help": "skip (and count) unreadable images"})
    ignore_metadata: bool = field(default=False, metadata={
        "help": "read image folders that hold a metadata.csv/.jsonl as plain folders (that file is ignored)"})
    max_image_pixels: int = field(default=MAX_IMAGE_PIXELS, metadata={
        "help": "decompression guard: refuse images with more pixels than this (PIL's own limit by default)"})

    def __post_init__(self):
        check_positive(self, "max_train_samples", "max_image_pixels")


@dataclass
class PretrainingArguments:
    """FCMAE recipe and loop; defaults are those of the reference's `main_pretrain.py` (see the README)."""

    output_dir: str = field(default=None, metadata={"help": "where the model, checkpoints and reports go (required)"})
    overwrite_output_dir: bool = field(default=False, metadata={"help": "start over in an output folder with a run"})
    resume_from_checkpoint: str | None = field(default=None, metadata={"help": 'a checkpoint folder, or "latest"'})
    mask_ratio: float | None = field(default=None, metadata={"help": "default: the model's config (0.6)"})
    norm_pix_loss: bool = field(default=True, metadata={"help": "per-patch normalised targets (reference default)"})
    sparse_backend: Literal["dense", "gather", "minkowski"] | None = None
    sparse_grn_scope: Literal["batch", "sample"] | None = None
    mask_strategy: Literal["fcmae", "mixmae"] | None = None
    crop_min_scale: float = field(default=0.2, metadata={"help": "RandomResizedCrop lower scale"})
    streaming: bool = field(default=False, metadata={"help": "stream the dataset (needs --max_train_steps)"})
    seed: int = 0
    per_device_train_batch_size: int = 64
    gradient_accumulation_steps: int = 1
    base_learning_rate: float = field(default=1.5e-4, metadata={"help": "lr = base x total batch / 256"})
    learning_rate: float | None = field(default=None, metadata={"help": "absolute lr (instead of the scaling)"})
    weight_decay: float = 0.05
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    num_train_epochs: float = 800
    max_train_steps: int | None = field(default=None, metadata={"help": "overrides --num_train_epochs"})
    lr_scheduler_type: str = "cosine"
    warmup_epochs: float = 40
    num_warmup_steps: int | None = field(default=None, metadata={"help": "overrides --warmup_epochs"})
    mixed_precision: Literal["no", "fp16", "bf16"] | None = field(default=None, metadata={
        "help": "default: the Accelerate config's, else bf16 on a CUDA GPU that has it, else none; 'no' for fp32 "
                "(TF32 matrix products on CUDA)"})
    torch_compile: bool = field(default=False, metadata={
        "help": "compile the model with torch.compile (inductor; one graph per backend, static shapes)"})
    torch_compile_mode: Literal["default", "reduce-overhead", "max-autotune"] | None = None
    deterministic: bool = field(default=False, metadata={
        "help": "deterministic algorithms (cuDNN, cuBLAS workspace): GPU runs and resumes repeat bit for bit, slower"})
    gradient_checkpointing: bool = field(default=False, metadata={"help": "recompute blocks in backward (less memory)"})
    checkpointing_steps: str | None = field(default=None, metadata={"help": 'an integer (every N steps) or "epoch"'})
    checkpoints_total_limit: int | None = field(default=3, metadata={
        "help": "keep this many newest checkpoints (the reference keeps 3); older ones go once a new one is complete"})
    recipe: str | None = field(default=None, metadata={
        "help": "a published reference recipe (TRAINING.md): base; flags given explicitly win"})
    with_tracking: bool = field(default=False, metadata={"help": "log to --report_to"})
    report_to: str = "tensorboard"
    logging_steps: int = 10
    dataloader_num_workers: int | None = field(default=None, metadata={
        "help": "data-loading processes per training process (default: the cores each training process of this "
                "machine has; the reference uses 10)"})
    push_to_hub: bool = False
    hub_model_id: str | None = None
    hub_token: str | None = None

    def __post_init__(self):
        require(bool(self.output_dir), "output_dir", self.output_dir, "given")
        check_positive(self, "per_device_train_batch_size", "gradient_accumulation_steps", "num_train_epochs",
                       "max_train_steps", "logging_steps", "checkpoints_total_limit", "base_learning_rate",
                       "learning_rate")
        check_positive(self, "weight_decay", "warmup_epochs", "num_warmup_steps", "dataloader_num_workers",
                       allow_zero=True)
        require(self.mask_ratio is None or 0 < self.mask_ratio < 1, "mask_ratio", self.mask_ratio, "between 0 and 1")
        require(0 < self.crop_min_scale <= 1, "crop_min_scale", self.crop_min_scale, "in (0, 1]")
        for beta in ("adam_beta1", "adam_beta2"):
            require(0 <= getattr(self, beta) < 1, beta, getattr(self, beta), "in [0, 1)")
        every = self.checkpointing_steps
        require(every is None or every == "epoch" or (every.isdigit() and int(every) > 0), "checkpointing_steps",
                every, 'a positive integer or "epoch"')
        require(not self.streaming or self.max_train_steps is not None, "streaming", True,
                "combined with --max_train_steps (a stream has no length to count epochs by)")
        if self.with_tracking:
            check_trackers_installed(self.report_to)


@dataclass
class FinetuningArguments:
    """What fine-tuning adds to transformers' `TrainingArguments`: the reference fine-tuning recipe."""

    overwrite_output_dir: bool = field(default=False, metadata={"help": "start over in an output folder with a run"})
    train_val_split: float = field(default=0.15, metadata={"help": "held-out fraction when there is no validation set"})
    label_column_name: str | None = None
    max_eval_samples: int | None = None
    streaming: bool = field(default=False, metadata={
        "help": "stream --dataset_name instead of downloading it whole (shards given by --train_files always stream)"})
    crop_min_scale: float = field(default=0.08, metadata={"help": "RandomResizedCrop lower scale for training"})
    base_learning_rate: float = field(default=5e-4, metadata={
        "help": "without --learning_rate: lr = base x total batch / 256 (reference 5e-4)"})
    warmup_epochs: float = field(default=20, metadata={"help": "linear warm-up, unless --warmup_steps is given"})
    drop_path_rate: float = 0.0
    head_init_scale: float = field(default=0.001, metadata={"help": "a new head is initialised at std 0.02 x this"})
    layer_decay: float | None = field(default=None, metadata={"help": "layer-wise lr decay factor, e.g. 0.9"})
    layer_decay_type: Literal["single", "group"] = field(default="single", metadata={"help": "as in the reference"})
    ignore_mismatched_sizes: bool = field(default=False, metadata={"help": "allow a checkpoint head of another size"})
    model_ema: bool = field(default=False, metadata={"help": "keep an exponential moving average of the weights"})
    model_ema_decay: float = 0.9999
    mixup: float = field(default=0.0, metadata={"help": "mixup alpha (0 = off); reference 0.8"})
    cutmix: float = field(default=0.0, metadata={"help": "cutmix alpha (0 = off); reference 1.0"})
    mixup_switch_prob: float = 0.5
    aa: str = field(default="rand-m9-mstd0.5-inc1", metadata={
        "help": "RandAugment config in timm's syntax (the reference's default), or none"})
    reprob: float = field(default=0.25, metadata={"help": "random erasing probability (0 = off)"})
    remode: Literal["pixel", "rand", "const"] = field(default="pixel", metadata={"help": "random erasing fill"})
    recount: int = field(default=1, metadata={"help": "random erasing rectangles per image"})
    color_jitter: float = field(default=0.4, metadata={"help": "colour jitter strength, used only with --aa none"})
    deterministic: bool = field(default=False, metadata={
        "help": "deterministic algorithms (cuDNN, cuBLAS workspace): GPU runs and resumes repeat bit for bit, slower"})
    recipe: str | None = field(default=None, metadata={
        "help": "a published recipe: atto ... huge (ImageNet-1K), nano|tiny|base|large|huge-22k (ImageNet-22K "
                "intermediate) and <size>-22k-1k (1K after 22K); the card says its source; flags given explicitly win"})

    def __post_init__(self):
        from .data.rand_augment import RandAugment

        if self.aa != "none":
            RandAugment.from_config(self.aa, (0, 0, 0))  # fail before any work
        require(0 <= self.reprob <= 1, "reprob", self.reprob, "in [0, 1]")
        check_positive(self, "recount", allow_none=False)
        check_positive(self, "color_jitter", allow_zero=True)
        require(0 < self.train_val_split < 1, "train_val_split", self.train_val_split, "between 0 and 1")
        require(0 < self.crop_min_scale <= 1, "crop_min_scale", self.crop_min_scale, "in (0, 1]")
        require(0 <= self.drop_path_rate < 1, "drop_path_rate", self.drop_path_rate, "in [0, 1)")
        require(self.layer_decay is None or 0 < self.layer_decay <= 1, "layer_decay", self.layer_decay, "in (0, 1]")
        require(0 < self.model_ema_decay < 1, "model_ema_decay", self.model_ema_decay, "between 0 and 1")
        require(0 <= self.mixup_switch_prob <= 1, "mixup_switch_prob", self.mixup_switch_prob, "in [0, 1]")
        check_positive(self, "max_eval_samples", "head_init_scale", "base_learning_rate")
        check_positive(self, "warmup_epochs", allow_zero=True)
        check_positive(self, "mixup", "cutmix", allow_zero=True)


# The reference `main_finetune.py` defaults, where transformers' `TrainingArguments` has others of its own.
# `learning_rate` stays unset so that `base_learning_rate` scales with the batch, as in the reference.


def default_num_workers() -> int:
    """As many data-loading workers as the cores each training process of this machine has (the cores this process
    may use, shared by the launch's processes on this machine): a GPU eats images faster than the reference's 10
    workers decode them (base at 2,000 images/s needs about 4 cores per 500 images/s, see the data benchmark)."""
    import os

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, cores // int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


def use_cpu_processes() -> bool:
    """Several processes but no CUDA (e.g. `accelerate launch --multi_gpu --num_processes 2` on a CPU machine):
    run them as CPU data parallelism over gloo instead of as independent single-process runs."""
    import os

    import torch

    if os.environ.get("ACCELERATE_USE_CPU", "false").lower() in ("1", "true"):
        return True
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()


def multi_cpu_config_run_alone() -> str | None:
    """A warning when Accelerate's default config asks for several CPU processes (`distributed_type: MULTI_CPU`)
    but this is the only one: `accelerate launch` starts MULTI_CPU as one process unless under mpirun."""
    import os

    if "WORLD_SIZE" in os.environ or "ACCELERATE_USE_CPU" not in os.environ:  # not the simple launcher's run
        return None
    try:
        from accelerate.commands.config import default_config_file, load_config_from_file

        config = load_config_from_file(None) if os.path.isfile(default_config_file) else None
    except Exception:  # noqa: BLE001 - an unreadable config is Accelerate's to report
        return None
    if config is None or config.distributed_type.value != "MULTI_CPU" or (config.num_processes or 1) <= 1:
        return None
    return (f"The Accelerate config ({default_config_file}) asks for {config.num_processes} CPU processes "
            "(MULTI_CPU), but `accelerate launch` runs MULTI_CPU as one process unless under mpirun: this run is one "
            f"process. For {config.num_processes} processes on this machine: accelerate launch --multi_gpu "
            f"--num_processes {config.num_processes} (CPU data parallelism over gloo).")


REFERENCE_TRAINER_DEFAULTS = dict(
    per_device_train_batch_size=64, num_train_epochs=100, learning_rate=None, weight_decay=0.05,
    lr_scheduler_type="cosine_with_min_lr", lr_scheduler_kwargs={"min_lr": 1e-6}, label_smoothing_factor=0.1,
    seed=0, eval_strategy="epoch", save_strategy="epoch", save_total_limit=3,
)


def check_trainer_arguments(training_args) -> None:
    """What transformers' `TrainingArguments` accepts but cannot train with, refused before any work."""
    check_positive(training_args, "num_train_epochs", "per_device_train_batch_size", "per_device_eval_batch_size",
                   "gradient_accumulation_steps", "learning_rate")
    check_positive(training_args, "weight_decay", "warmup_steps", allow_zero=True)
    require(training_args.max_steps == -1 or training_args.max_steps > 0, "max_steps", training_args.max_steps,
            "greater than zero (or -1: use --num_train_epochs)")
    smoothing = training_args.label_smoothing_factor
    require(0 <= smoothing < 1, "label_smoothing_factor", smoothing, "in [0, 1)")
    check_trackers_installed(training_args.report_to or [])


def check_trackers_installed(names) -> None:
    """Every logger named in `--report_to` must be importable: a run that was asked to log must not run unlogged."""
    import importlib.util

    modules = {"tensorboard": ("tensorboard", "tensorboardX"), "wandb": ("wandb",), "comet_ml": ("comet_ml",),
               "mlflow": ("mlflow",), "clearml": ("clearml",), "aim": ("aim",), "dvclive": ("dvclive",),
               "trackio": ("trackio",), "swanlab": ("swanlab",), "neptune": ("neptune",)}
    for name in [names] if isinstance(names, str) else names:
        if name in ("none", "all"):
            continue
        candidates = modules.get(name, (name,))
        if not any(importlib.util.find_spec(module) for module in candidates):
            raise ValueError(f"--report_to {name}: {candidates[0]} is not installed; pip install {candidates[0]}, or "
                             "choose another logger (--report_to none logs nothing).")


# --------------------------------------------------------------------------------------------- given flags


def parse_marking_given(parser, argv: list[str] | None):
    """`parser.parse_args_into_dataclasses(argv)`, each of our dataclasses told which of its flags the command line
    gave (`given_flags`), so that only an explicitly given flag overrides `--config_overrides` or a checkpoint."""
    parsed = parser.parse_args_into_dataclasses(args=argv)
    words = {word.split("=", 1)[0] for word in (sys.argv[1:] if argv is None else argv) if word.startswith("--")}
    given = {action.dest for action in parser._actions if words & set(action.option_strings)}
    for args in parsed:
        args.given_flags = given
    return parsed


def flag_given(args, name: str) -> bool:
    """Whether `--name` was given; for arguments built in Python, whether it differs from its default."""
    given = getattr(args, "given_flags", None)
    if given is not None:
        return name in given
    default = next(f.default for f in dataclasses.fields(args) if f.name == name)
    return getattr(args, name) != default


def merge_flag_into_overrides(overrides: dict, args, name: str, fallback=dataclasses.MISSING) -> None:
    """A config field that both a dedicated flag and `--config_overrides` can set: the two must agree; the given
    one wins; with neither, `fallback` (if any) is used, else the field is left to the config or checkpoint."""
    value, given = getattr(args, name), flag_given(args, name)
    if given and name in overrides and overrides[name] != value:
        raise ValueError(f"--{name} {value!r} and --config_overrides {name}={overrides[name]!r} disagree; give one "
                         "of them.")
    if given:
        overrides[name] = value
    elif name not in overrides and fallback is not dataclasses.MISSING:
        overrides[name] = fallback


# --------------------------------------------------------------------------------------------- config overrides


def split_top_level(text: str) -> list[str]:
    """Split on commas that are not inside brackets."""
    parts, depth, current = [], 0, ""
    for char in text:
        depth += (char in "[({") - (char in "])}")
        if char == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += char
    return [part.strip() for part in parts + [current] if part.strip()]


def parse_literal(text: str):
    """JSON or Python literals (`[1,2]`, `0.5`, `true`, `False`, `null`); anything else stays a string."""
    for parse in (json.loads, ast.literal_eval):
        try:
            return parse(text)
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
            continue
    return {"true": True, "false": False, "none": None}.get(text.lower(), text)


def config_field_names() -> set[str]:
    return {f.name for f in dataclasses.fields(ConvNextV2Config)} | set(ConvNextV2Config.attribute_map)


def parse_config_overrides(text: str | None) -> dict:
    """`key=value,...` with typed values (`use_grn=false` is the boolean False); unknown keys are errors."""
    overrides, known = {}, config_field_names()
    for part in split_top_level(text or ""):
        key, sep, value = part.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ValueError(f"--config_overrides entry {part!r} is not key=value.")
        if key not in known:
            close = difflib.get_close_matches(key, sorted(known), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else "; see ConvNextV2Config for the fields."
            raise ValueError(f"--config_overrides: {key!r} is not a ConvNextV2Config field{hint}")
        overrides[key] = parse_literal(value.strip())
        if key in FIELD_CHECKS:
            try:
                FIELD_CHECKS[key](key, overrides[key])
            except ValueError as error:
                raise ValueError(f"--config_overrides {part.strip()!r}: {error}") from None
    return overrides
