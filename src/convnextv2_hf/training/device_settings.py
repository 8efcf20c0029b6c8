"""How a run uses its device: precision defaults (bf16 autocast on CUDA, TF32 matrix products in fp32) and the
deterministic mode, shared by the pre-training and fine-tuning scripts."""

from __future__ import annotations

import os

import torch


def cuda_bf16_available() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def default_mixed_precision(asked: str | None) -> str | None:
    """`asked` if given (a flag), else the Accelerate launch config's choice, else bf16 where CUDA has it (the
    reference trains with `--use_amp`), else none. `--mixed_precision no` turns it off."""
    if asked is not None or os.environ.get("ACCELERATE_MIXED_PRECISION"):
        return asked
    return "bf16" if cuda_bf16_available() else None


def use_device_settings(deterministic: bool) -> None:
    """fp32 matrix products in TF32 on CUDA (`high`: what autocast leaves in fp32 runs at tensor-core speed), and
    with `deterministic` the same numbers run to run: deterministic algorithms, cuDNN without autotuning, a fixed
    cuBLAS workspace. Without it, cuDNN's and atomics' choices make GPU runs differ in the last bits."""
    if torch.cuda.is_available():
        torch.set_float32_matmul_precision("high")
        torch.backends.cudnn.allow_tf32 = True
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False


def finetuning_precision(training_args, given) -> None:
    """The Trainer's precision: bf16 by default where CUDA has it (as in pre-training), unless `--bf16 false`,
    `--fp16` or the Accelerate config chose; `given(name)` says whether a flag was given."""
    chosen = given("bf16") or given("fp16") or training_args.mixed_precision != "no" or training_args.use_cpu
    if not chosen and cuda_bf16_available():
        training_args.bf16, training_args.mixed_precision = True, "bf16"


def finetuning_pin_memory(training_args, given) -> None:
    """Pinned loader memory only where there is an accelerator to copy to (`--dataloader_pin_memory` decides when
    given): on a CPU-only machine the Trainer's default makes every loader warn that it pins nothing."""
    if not given("dataloader_pin_memory") and (training_args.use_cpu or not torch.accelerator.is_available()):
        training_args.dataloader_pin_memory = False


def precision_description(mixed_precision: str, device_type: str) -> str:
    """What a run computed in, for the log and the card, e.g. `bf16 autocast on cuda`."""
    precision = {"no": "fp32", "bf16": "bf16 autocast", "fp16": "fp16 autocast"}.get(mixed_precision, mixed_precision)
    if precision == "fp32" and device_type == "cuda":
        precision += " (TF32 matrix products)"
    return f"{precision} on {device_type}"


def trainer_precision_line(training_args) -> str:
    device = "cuda" if torch.cuda.is_available() and not training_args.use_cpu else "cpu"
    return precision_description(training_args.mixed_precision, device)
