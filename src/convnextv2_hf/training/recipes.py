"""The reference repository's published training recipes (its TRAINING.md), as `--recipe NAME`.

TRAINING.md publishes the ImageNet-1K fine-tuning commands of three sizes (atto, tiny, base) and the pre-training
command of base; the paper's other sizes have no published command, so they have no recipe here. A recipe sets every
hyper-parameter of the command; a flag given on the command line wins and is reported as a deviation (log and card).
The total batch is the reference's (per-device batch x devices x accumulation), the learning rate
`base_learning_rate x total batch / 256` as in the reference scripts.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, fields

from .arguments import flag_given

logger = logging.getLogger(__name__)

# TRAINING.md, "ImageNet-1K Fine-Tuning": 4 nodes x 8 GPUs x batch 32 (or 8 GPUs x 32 x update_freq 4) = 1024.
# Every command also has --model_ema True --model_ema_eval True --use_amp True, and the main_finetune.py defaults
# for what it does not set (RandAugment rand-m9-mstd0.5-inc1, random erasing in pixel mode, 224 px).
_FINETUNE_COMMON = dict(per_device_train_batch_size=32, image_size=224, reprob=0.25, model_ema=True)
FINETUNE_RECIPES = {
    "atto": dict(_FINETUNE_COMMON, model_preset="atto", base_learning_rate=2e-4, num_train_epochs=600,
                 warmup_epochs=0, layer_decay_type="single", layer_decay=0.9, weight_decay=0.3, drop_path_rate=0.1,
                 mixup=0.0, cutmix=0.0, label_smoothing_factor=0.2),
    "tiny": dict(_FINETUNE_COMMON, model_preset="tiny", base_learning_rate=8e-4, num_train_epochs=300,
                 warmup_epochs=40, layer_decay_type="single", layer_decay=0.9, weight_decay=0.05, drop_path_rate=0.2,
                 mixup=0.8, cutmix=1.0, label_smoothing_factor=0.1),
    "base": dict(_FINETUNE_COMMON, model_preset="base", base_learning_rate=6.25e-4, num_train_epochs=100,
                 warmup_epochs=20, layer_decay_type="group", layer_decay=0.6, weight_decay=0.05, drop_path_rate=0.1,
                 mixup=0.8, cutmix=1.0, label_smoothing_factor=0.1),
}
FINETUNE_TOTAL_BATCH = 1024
# TRAINING.md, "ImageNet-1K FCMAE Pre-Training": 8 nodes x 8 GPUs x batch 64 (or 8 GPUs x 64 x update_freq 8) = 4096.
PRETRAIN_RECIPES = {
    "base": dict(model_preset="base", per_device_train_batch_size=64, base_learning_rate=1.5e-4,
                 num_train_epochs=1600, warmup_epochs=40, image_size=224),
}
PRETRAIN_TOTAL_BATCH = 4096
SIZES = ("atto", "femto", "pico", "nano", "tiny", "base", "large", "huge")


@dataclass
class AppliedRecipe:
    """What `--recipe` did: its name, the values it set, and the flags the command line gave instead."""

    name: str
    settings: dict
    deviations: dict


def check_recipe_name(name: str | None, recipes: dict, script: str) -> None:
    if name is None or name in recipes:
        return
    published = ", ".join(recipes)
    if name in SIZES:
        raise ValueError(f"--recipe {name}: the reference's TRAINING.md publishes {script} commands for {published} "
                         "only; give the flags yourself (the nearest published recipe is a starting point).")
    raise ValueError(f"--recipe {name!r} is not a recipe; choose one of {published}.")


def apply_recipe(name: str, recipes: dict, total_batch: int, world_size: int, script: str,
                 *argument_objects) -> AppliedRecipe:
    """Set the recipe's values on the parsed arguments, except where a flag was given; the accumulation steps make
    the total batch the reference's. A name that is not one of `recipes` (those of `script`) is refused."""
    check_recipe_name(name, recipes, script)
    settings, deviations = dict(recipes[name]), {}
    for key, value in settings.items():
        owner = next((args for args in argument_objects if key in {f.name for f in fields(args)}), None)
        if owner is None:
            raise KeyError(f"recipe field {key!r} has no flag")  # a bug in the recipe table
        if flag_given(owner, key) and getattr(owner, key) != value:
            deviations[key] = getattr(owner, key)
        else:
            setattr(owner, key, value)
    batch_owner = next(args for args in argument_objects if hasattr(args, "gradient_accumulation_steps"))
    per_step = batch_owner.per_device_train_batch_size * world_size
    if not flag_given(batch_owner, "gradient_accumulation_steps"):
        if total_batch % per_step:
            raise ValueError(f"--recipe {name}: the reference's total batch {total_batch} is not a multiple of "
                             f"{per_step} (batch per device x {world_size} process(es)); choose "
                             "--per_device_train_batch_size so that it is, or give --gradient_accumulation_steps.")
        batch_owner.gradient_accumulation_steps = total_batch // per_step
    settings["total batch"] = total_batch
    if per_step * batch_owner.gradient_accumulation_steps != total_batch:
        deviations["total batch"] = per_step * batch_owner.gradient_accumulation_steps
    for key, value in deviations.items():
        logger.warning("--recipe %s: %s is %s instead of the recipe's %s (given on the command line).", name, key,
                       value, settings[key])
    return AppliedRecipe(name, settings, deviations)


def note_model(applied: AppliedRecipe | None, config) -> None:
    """A recipe names a size: a model of other depths or widths (from --config_overrides or a start folder) is a
    deviation, logged and on the card, with what was trained."""
    from ..configuration_convnextv2 import CONVNEXTV2_PRESETS

    if applied is None or applied.name not in CONVNEXTV2_PRESETS:
        return
    depths, widths = (list(values) for values in CONVNEXTV2_PRESETS[applied.name])
    if list(config.depths) != depths or list(config.hidden_sizes) != widths:
        trained = f"depths {list(config.depths)}, widths {list(config.hidden_sizes)}"
        applied.settings["model"] = f"{applied.name}: depths {depths}, widths {widths}"
        applied.deviations["model"] = trained
        logger.warning("--recipe %s: the model trained has %s, not the recipe's %s size.", applied.name, trained,
                       applied.name)


def card_lines(applied: AppliedRecipe | None) -> dict[str, str]:
    """A card's account of `--recipe`: which published recipe, and the flags given instead of its values."""
    if applied is None:
        return {}
    deviations = ", ".join(f"{key} {value}" for key, value in applied.deviations.items()) or "none"
    return {"reference recipe": f"{applied.name} (TRAINING.md of facebookresearch/ConvNeXt-V2)",
            "deviations from it": deviations}
