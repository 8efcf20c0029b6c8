"""The training settings the reference publishes, as `--recipe NAME`, all in this one table.

Fine-tuning: every size's ImageNet-1K recipe (`atto` ... `huge`), ImageNet-22K intermediate fine-tuning
(`<size>-22k`, sizes nano to huge) and the ImageNet-1K fine-tuning that follows it (`<size>-22k-1k`). Atto, tiny and
base are the commands of the reference's TRAINING.md; the other sizes and the 22K recipes come from the ConvNeXt V2
paper alone (appendix A.2, Tables 9-13), which each card says. Pre-training: base, TRAINING.md's command.

A recipe sets every hyper-parameter it names; a flag given on the command line wins and is reported as a deviation
(log and card). The total batch is the recipe's (per-device batch x devices x accumulation), the learning rate
`base_learning_rate x total batch / 256` as in the reference scripts.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, fields

from .arguments import flag_given

logger = logging.getLogger(__name__)

TRAINING_MD = "TRAINING.md of facebookresearch/ConvNeXt-V2"
PAPER_ONLY = "the ConvNeXt V2 paper alone (appendix A.2, Table {table}); TRAINING.md has no command for it"
ERASING_NOTE = "random erasing 0.25: the reference code's, not in the paper's tables"


@dataclass(frozen=True)
class Recipe:
    """One published setting: the flag values it sets, the total batch it assumes, where it comes from, and the
    flags it leaves to the user (flag -> why: the source gives no reliable value)."""

    values: dict
    total_batch: int
    source: str
    notes: tuple[str, ...] = ()
    required: dict = field(default_factory=dict)


# Shared by the ImageNet-1K fine-tuning commands: 4 nodes x 8 GPUs x batch 32 = 1024, EMA, RandAugment
# rand-m9-mstd0.5-inc1 (main_finetune.py's default), random erasing 0.25 in pixel mode, 224 px.
_IN1K = dict(per_device_train_batch_size=32, image_size=224, reprob=0.25, model_ema=True)


def _in1k(size, blr, epochs, warmup, decay_type, decay, weight_decay, drop_path, mixup, cutmix, smoothing) -> dict:
    return dict(_IN1K, model_preset=size, base_learning_rate=blr, num_train_epochs=epochs, warmup_epochs=warmup,
                layer_decay_type=decay_type, layer_decay=decay, weight_decay=weight_decay, drop_path_rate=drop_path,
                mixup=mixup, cutmix=cutmix, label_smoothing_factor=smoothing)


_BASE_LR_NOTE = "base learning rate 6.25e-4 as TRAINING.md's base command (the paper's Table 11 prints 6.25e-3)"
FINETUNE_RECIPES = {
    "atto": Recipe(_in1k("atto", 2e-4, 600, 0, "single", 0.9, 0.3, 0.1, 0.0, 0.0, 0.2), 1024, TRAINING_MD),
    "femto": Recipe(_in1k("femto", 2e-4, 600, 0, "single", 0.9, 0.05, 0.0, 0.3, 0.3, 0.2), 1024,
                    PAPER_ONLY.format(table=9),
                    ("weight decay 0.05 as the paper prints it (atto, pico and nano: 0.3)", ERASING_NOTE)),
    "pico": Recipe(_in1k("pico", 2e-4, 600, 0, "single", 0.9, 0.3, 0.0, 0.3, 0.3, 0.2), 1024,
                   PAPER_ONLY.format(table=9), (ERASING_NOTE,)),
    "nano": Recipe(_in1k("nano", 2e-4, 600, 0, "single", 0.9, 0.3, 0.1, 0.5, 0.5, 0.2), 1024,
                   PAPER_ONLY.format(table=9), (ERASING_NOTE,)),
    "tiny": Recipe(_in1k("tiny", 8e-4, 300, 40, "single", 0.9, 0.05, 0.2, 0.8, 1.0, 0.1), 1024, TRAINING_MD),
    "base": Recipe(_in1k("base", 6.25e-4, 100, 20, "group", 0.6, 0.05, 0.1, 0.8, 1.0, 0.1), 1024, TRAINING_MD,
                   (_BASE_LR_NOTE,)),
    "large": Recipe(_in1k("large", 6.25e-4, 100, 20, "group", 0.6, 0.05, 0.2, 0.8, 1.0, 0.1), 1024,
                    PAPER_ONLY.format(table=11), (_BASE_LR_NOTE.replace("base command", "base command, same row"),
                                                  ERASING_NOTE)),
    "huge": Recipe(_in1k("huge", 1.25e-3, 50, 10, "single", 0.75, 0.05, 0.3, 0.8, 1.0, 0.1), 1024,
                   PAPER_ONLY.format(table=11), (ERASING_NOTE,)),
}
# ImageNet-22K intermediate fine-tuning (Table 12): total batch 4096, 90 epochs, no EMA; drop path of nano and tiny
# is printed illegibly ("0.(N/T)"), so those two recipes ask for --drop_path_rate.
_DROP_PATH_ILLEGIBLE = "the paper's Table 12 prints its drop path illegibly ('0.(N/T)')"
for _size, _decay, _drop_path in (("nano", 0.9, None), ("tiny", 0.9, None), ("base", 0.8, 0.1), ("large", 0.8, 0.1),
                                  ("huge", 0.8, 0.3)):
    _values = dict(_IN1K, model_preset=_size, base_learning_rate=2.5e-4, num_train_epochs=90, warmup_epochs=5,
                   layer_decay_type="single", layer_decay=_decay, weight_decay=0.05, mixup=0.8, cutmix=1.0,
                   label_smoothing_factor=0.1, model_ema=False)
    if _drop_path is not None:
        _values["drop_path_rate"] = _drop_path
    FINETUNE_RECIPES[f"{_size}-22k"] = Recipe(
        _values, 4096, PAPER_ONLY.format(table=12), (ERASING_NOTE,),
        {} if _drop_path is not None else {"drop_path_rate": _DROP_PATH_ILLEGIBLE})
# ImageNet-1K fine-tuning of a 22K fine-tuned classifier (Table 13): total batch 512, no warm-up, no mixup; a new
# 1000-class head replaces the 22K one.
for _size, _epochs, _decay, _drop_path, _ema in (("nano", 90, 0.9, 0.1, True), ("tiny", 90, 0.9, 0.1, True),
                                                 ("base", 30, 0.8, 0.2, True), ("large", 30, 0.8, 0.3, True),
                                                 ("huge", 30, 0.85, 0.5, False)):
    FINETUNE_RECIPES[f"{_size}-22k-1k"] = Recipe(
        dict(_IN1K, model_preset=_size, base_learning_rate=2.5e-5, num_train_epochs=_epochs, warmup_epochs=0,
             layer_decay_type="single", layer_decay=_decay, weight_decay=1e-8, drop_path_rate=_drop_path, mixup=0.0,
             cutmix=0.0, label_smoothing_factor=0.1, model_ema=_ema, ignore_mismatched_sizes=True),
        512, PAPER_ONLY.format(table=13), (ERASING_NOTE,))
# TRAINING.md, "ImageNet-1K FCMAE Pre-Training": 8 nodes x 8 GPUs x batch 64 = 4096.
PRETRAIN_RECIPES = {
    "base": Recipe(dict(model_preset="base", per_device_train_batch_size=64, base_learning_rate=1.5e-4,
                        num_train_epochs=1600, warmup_epochs=40, image_size=224), 4096, TRAINING_MD),
}
SIZES = ("atto", "femto", "pico", "nano", "tiny", "base", "large", "huge")


@dataclass
class AppliedRecipe:
    """What `--recipe` did: its name, the values it set, and the flags the command line gave instead."""

    name: str
    settings: dict
    deviations: dict
    source: str = TRAINING_MD
    notes: tuple[str, ...] = ()


def check_recipe_name(name: str | None, recipes: dict, script: str) -> None:
    if name is None or name in recipes:
        return
    published = ", ".join(recipes)
    if name in SIZES:
        raise ValueError(f"--recipe {name}: the reference publishes {script} recipes for {published} only; give "
                         "the flags yourself (the nearest published recipe is a starting point).")
    raise ValueError(f"--recipe {name!r} is not a recipe; choose one of {published}.")


def apply_recipe(name: str, recipes: dict, world_size: int, script: str, *argument_objects) -> AppliedRecipe:
    """Set the recipe's values on the parsed arguments, except where a flag was given; the accumulation steps make
    the total batch the recipe's. A name that is not one of `recipes` (those of `script`) is refused, and so is a
    recipe whose source leaves a value to the user when the flag is not given."""
    check_recipe_name(name, recipes, script)
    recipe = recipes[name]
    for key, why in recipe.required.items():
        if not any(flag_given(args, key) for args in argument_objects if key in {f.name for f in fields(args)}):
            raise ValueError(f"--recipe {name}: {why}; give --{key} yourself.")
    settings, deviations, total_batch = dict(recipe.values), {}, recipe.total_batch
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
    return AppliedRecipe(name, settings, deviations, recipe.source, recipe.notes)


def note_model(applied: AppliedRecipe | None, config) -> None:
    """A recipe names a size: a model of other depths or widths (from --config_overrides or a start folder) is a
    deviation, logged and on the card, with what was trained."""
    from ..configuration_convnextv2 import CONVNEXTV2_PRESETS

    size = applied.settings.get("model_preset") if applied is not None else None
    if size not in CONVNEXTV2_PRESETS:
        return
    depths, widths = (list(values) for values in CONVNEXTV2_PRESETS[size])
    if list(config.depths) != depths or list(config.hidden_sizes) != widths:
        trained = f"depths {list(config.depths)}, widths {list(config.hidden_sizes)}"
        applied.settings["model"] = f"{size}: depths {depths}, widths {widths}"
        applied.deviations["model"] = trained
        logger.warning("--recipe %s: the model trained has %s, not the recipe's %s size.", applied.name, trained, size)


def card_lines(applied: AppliedRecipe | None) -> dict[str, str]:
    """A card's account of `--recipe`: which published recipe and where its values come from, and the flags given
    instead of its values."""
    if applied is None:
        return {}
    deviations = ", ".join(f"{key} {value}" for key, value in applied.deviations.items()) or "none"
    lines = {"reference recipe": f"{applied.name} ({applied.source})"}
    if applied.notes:
        lines["recipe notes"] = "; ".join(applied.notes)
    return lines | {"deviations from it": deviations}
