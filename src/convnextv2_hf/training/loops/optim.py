"""Optimizer parameter groups: weight-decay exclusions and layer-wise learning-rate decay (the reference recipe)."""

from __future__ import annotations

import re

import torch
from torch import nn

_STEM = re.compile(r"(^|\.)embeddings\.")
_DOWNSAMPLE = re.compile(r"(^|\.)encoder\.stages\.(\d+)\.downsampling_layer\.")
_BLOCK = re.compile(r"(^|\.)encoder\.stages\.(\d+)\.layers\.(\d+)\.")


def no_weight_decay(name: str, param: torch.Tensor, recipe: str = "finetune") -> bool:
    """Which parameters the reference leaves undecayed: in pre-training (timm's `add_weight_decay` in
    `main_pretrain.py`) 1-D parameters (norms) and biases; in fine-tuning (`optim_factory.get_parameter_groups`)
    also the GRN gamma and beta."""
    if recipe not in ("pretrain", "finetune"):
        raise ValueError(f"recipe must be 'pretrain' or 'finetune', got {recipe!r}")
    return param.ndim <= 1 or name.endswith(".bias") or (recipe == "finetune" and ".grn." in name)


def layer_id(name: str, depths: list[int], mode: str = "single") -> int:
    """The layer index of a parameter for layer-wise lr decay, as in the reference implementation.

    `single`: stem and downsampling layers share the id of their stage's first block; blocks count 1..sum(depths);
    anything after the encoder (final norm, head) gets sum(depths) + 1.
    `group`: twelve groups of about three blocks (the third stage split by `block // 3`), head 13.
    """
    if mode not in ("single", "group"):
        raise ValueError(f"layer decay mode must be 'single' or 'group', got {mode!r}")
    stage, block = None, None
    if _STEM.search(name):
        stage = 0
    elif found := _DOWNSAMPLE.search(name):
        stage = int(found.group(2))
    elif found := _BLOCK.search(name):
        stage, block = int(found.group(2)), int(found.group(3))
    if stage is None:
        return sum(depths) + 1 if mode == "single" else 13
    if mode == "single":
        return sum(depths[:stage]) + (block or 0) + 1
    if block is None:  # stem and downsampling layers
        return {0: 0, 1: 2, 2: 3}.get(stage, 12)
    if stage < 2:
        return stage + 1
    return 3 + block // 3 if stage == 2 else 12


def num_layer_ids(depths: list[int], mode: str) -> int:
    return sum(depths) if mode == "single" else 12


def param_groups(
    model: nn.Module,
    weight_decay: float = 0.05,
    layer_decay: float | None = None,
    layer_decay_mode: str = "single",
    learning_rate: float | None = None,
    recipe: str = "finetune",
) -> list[dict]:
    """Parameter groups for `torch.optim` optimizers.

    Without `layer_decay` there are two groups (decayed / not decayed, see [`no_weight_decay`] for `recipe`). With
    it, each layer id gets the scale `layer_decay ** (num_layers + 1 - id)`; groups carry `lr_scale` and, when
    `learning_rate` is given, `lr`.

    Example:

    ```python
    >>> import torch
    >>> from convnextv2_hf import ConvNextV2Config, ConvNextV2ForImageClassification
    >>> from convnextv2_hf.training.loops.optim import param_groups
    >>> model = ConvNextV2ForImageClassification(ConvNextV2Config.from_preset("atto", num_labels=10))
    >>> optimizer = torch.optim.AdamW(param_groups(model, 0.05, layer_decay=0.9, learning_rate=1e-3))
    ```
    """
    depths = list(getattr(model.config, "depths", []))
    groups: dict[tuple[int, bool], dict] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        decay = not no_weight_decay(name, param, recipe)
        lid = layer_id(name, depths, layer_decay_mode) if layer_decay is not None else 0
        key = (lid, decay)
        if key not in groups:
            scale = 1.0
            if layer_decay is not None:
                scale = layer_decay ** (num_layer_ids(depths, layer_decay_mode) + 1 - lid)
            groups[key] = {"params": [], "names": [], "weight_decay": weight_decay if decay else 0.0, "lr_scale": scale}
            if learning_rate is not None:
                groups[key]["lr"] = learning_rate * scale
        groups[key]["params"].append(param)
        groups[key]["names"].append(name)
    return [groups[k] for k in sorted(groups)]


def create_optimizer(model: nn.Module, args, layer_decay: float | None = None, layer_decay_mode: str = "single"):
    """AdamW over [`param_groups`] with the learning rate, betas, epsilon and weight decay of `TrainingArguments`.

    The fine-tuning Trainer builds it (`RecipeOptimizer`); the Trainer's schedule then scales every group.
    """
    groups = param_groups(model, args.weight_decay, layer_decay, layer_decay_mode, args.learning_rate)
    for group in groups:
        group.pop("names")
    return torch.optim.AdamW(groups, lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epsilon)
