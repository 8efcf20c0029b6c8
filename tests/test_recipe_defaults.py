"""Our scripts' defaults against the reference repository's own scripts, side by side.

Each row: (what, the reference's value and where it is set, ours as the scripts resolve it with no flags).
"""

import sys

import pytest
import torch
from transformers import TrainingArguments

from conftest import REPO, make_image_folder, run_as_user

from convnextv2_hf import ConvNextV2Config, ConvNextV2ForMaskedImageModeling, ConvNextV2ImageProcessor
from convnextv2_hf.training.arguments import REFERENCE_TRAINER_DEFAULTS, default_num_workers
from convnextv2_hf.training.loops.fcmae import TrainingPlan
from convnextv2_hf.training.finetune import parse_args as finetune_args
from convnextv2_hf.training.models import fcmae_overrides
from convnextv2_hf.training.loops.optim import param_groups
from convnextv2_hf.training.pretrain import parse_args as pretrain_args
from convnextv2_hf.training.recipes import (
    FINETUNE_RECIPES,
    PRETRAIN_RECIPES,
    apply_recipe,
    card_lines,
    check_recipe_name,
    note_model,
)


def reference_workers() -> int:
    """main_pretrain.py / main_finetune.py: --num_workers 10. Ours departs on purpose: every core a process has
    (more than 10 on GPU machines, where 10 workers cannot keep up with the GPU), fewer where there are fewer."""
    import os

    return len(os.sched_getaffinity(0))


def pretraining_rows():
    model_args, data_args, args = pretrain_args(["--output_dir", "unused"])
    config = ConvNextV2Config.from_preset(model_args.model_preset, **fcmae_overrides(model_args, args))
    processor = ConvNextV2ImageProcessor()
    return [
        # main_pretrain.py: parser.add_argument(...) / parser.set_defaults(...)
        ("model (--model)", "convnextv2_base", f"convnextv2_{model_args.model_preset}"),
        ("input size", 224, model_args.image_size),
        ("mask ratio", 0.6, config.mask_ratio),
        ("norm_pix_loss", True, config.norm_pix_loss),  # parser.set_defaults(norm_pix_loss=True)
        ("decoder depth", 1, config.decoder_depth),
        ("decoder width", 512, config.decoder_hidden_size),
        ("batch size per device", 64, args.per_device_train_batch_size),
        ("gradient accumulation (--update_freq)", 1, args.gradient_accumulation_steps),
        ("epochs", 800, args.num_train_epochs),
        ("warm-up epochs", 40, args.warmup_epochs),
        ("base lr (--blr)", 1.5e-4, args.base_learning_rate),
        ("absolute lr (--lr)", None, args.learning_rate),
        ("lr on 64 devices (total batch 4096)", 1.5e-4 * 4096 / 256, TrainingPlan.learning_rate_for(args, 64)),
        ("schedule (cosine to --min_lr 0)", "cosine", args.lr_scheduler_type),
        ("AdamW betas", (0.9, 0.95), (args.adam_beta1, args.adam_beta2)),
        ("weight decay", 0.05, args.weight_decay),
        ("RandomResizedCrop scale", (0.2, 1.0), (args.crop_min_scale, 1.0)),
        ("normalisation mean", (0.485, 0.456, 0.406), tuple(processor.image_mean)),
        ("normalisation std", (0.229, 0.224, 0.225), tuple(processor.image_std)),
        ("seed", 0, args.seed),
        ("checkpoints kept (--save_ckpt_num)", 3, args.checkpoints_total_limit),
        ("data loader workers (--num_workers 10), ours: the cores per process", reference_workers(),
         default_num_workers() if args.dataloader_num_workers is None else args.dataloader_num_workers),
    ]


def finetuning_rows():
    model_args, data_args, recipe, training = finetune_args(["--output_dir", "unused"])
    return [
        # main_finetune.py: parser.add_argument(...)
        ("model (--model)", "convnextv2_base", f"convnextv2_{model_args.model_preset}"),
        ("input size", 224, model_args.image_size),
        ("batch size per device", 64, training.per_device_train_batch_size),
        ("epochs", 100, training.num_train_epochs),
        ("base lr (--blr), scaled by total batch / 256", 5e-4, recipe.base_learning_rate),
        ("absolute lr (--lr)", None, training.learning_rate),
        ("warm-up epochs", 20, recipe.warmup_epochs),
        ("schedule: cosine down to --min_lr", ("cosine", 1e-6),
         (training.lr_scheduler_type.value.removesuffix("_with_min_lr"), training.lr_scheduler_kwargs["min_lr"])),
        ("weight decay", 0.05, training.weight_decay),
        ("AdamW betas (optimizer default)", (0.9, 0.999), (training.adam_beta1, training.adam_beta2)),
        ("AdamW eps (--opt_eps)", 1e-8, training.adam_epsilon),
        ("layer decay (1.0 = off)", None, recipe.layer_decay),
        ("layer decay type", "single", recipe.layer_decay_type),
        ("drop path", 0.0, recipe.drop_path_rate),
        ("label smoothing (--smoothing)", 0.1, training.label_smoothing_factor),
        ("mixup / cutmix alpha", (0.0, 0.0), (recipe.mixup, recipe.cutmix)),
        ("mixup switch probability", 0.5, recipe.mixup_switch_prob),
        ("head init scale", 0.001, recipe.head_init_scale),
        ("EMA / decay", (False, 0.9999), (recipe.model_ema, recipe.model_ema_decay)),
        ("RandAugment (--aa)", "rand-m9-mstd0.5-inc1", recipe.aa),
        ("random erasing (--reprob, --remode, --recount)", (0.25, "pixel", 1), (recipe.reprob, recipe.remode,
                                                                                 recipe.recount)),
        ("colour jitter (off while --aa is set)", 0.4, recipe.color_jitter),
        ("RandomResizedCrop scale (timm default)", (0.08, 1.0), (recipe.crop_min_scale, 1.0)),
        ("seed", 0, training.seed),
        ("checkpoints kept (--save_ckpt_num)", 3, training.save_total_limit),
        ("data loader workers (--num_workers 10), ours: the cores per process", reference_workers(),
         training.dataloader_num_workers),
        ("pinned memory (--pin_mem)", True, training.dataloader_pin_memory),
    ]


def test_pretraining_defaults_are_the_reference_scripts():
    mismatches = [(what, ref, ours) for what, ref, ours in pretraining_rows() if ref != ours and not
                  (isinstance(ref, float) and abs(ref - ours) < 1e-12)]
    assert not mismatches, mismatches


def test_finetuning_defaults_are_the_reference_scripts():
    mismatches = [(what, ref, ours) for what, ref, ours in finetuning_rows() if ref != ours]
    assert not mismatches, mismatches
    assert set(REFERENCE_TRAINER_DEFAULTS) <= {f for f in TrainingArguments.__dataclass_fields__}


def test_weight_decay_exclusions_follow_each_reference_script():
    model = ConvNextV2ForMaskedImageModeling(ConvNextV2Config(depths=[1, 1, 1, 1], hidden_sizes=[8, 16, 24, 32]))

    def undecayed(recipe):
        return {n for g in param_groups(model, 0.05, recipe=recipe) if g["weight_decay"] == 0 for n in g["names"]}

    names = dict(model.named_parameters())
    # main_pretrain.py: timm's add_weight_decay -> no decay for 1-D parameters and biases only
    pretrain = undecayed("pretrain")
    assert pretrain == {n for n, p in names.items() if p.ndim <= 1 or n.endswith(".bias")}
    assert "decoder.mask_token" not in pretrain and not any(n.endswith("grn.weight") for n in pretrain)
    # main_finetune.py: optim_factory.get_parameter_groups -> also GRN gamma/beta
    finetune = undecayed("finetune")
    assert finetune == pretrain | {n for n in names if ".grn." in n}
    assert all(torch.is_tensor(names[n]) for n in finetune)


def test_norm_pix_loss_can_be_turned_off():
    assert pretrain_args(["--output_dir", "unused"])[2].norm_pix_loss is True
    assert pretrain_args(["--output_dir", "unused", "--no_norm_pix_loss"])[2].norm_pix_loss is False


# TRAINING.md of facebookresearch/ConvNeXt-V2, transcribed flag by flag: (--model size, --batch_size x nodes x GPUs,
# --blr, --epochs, --warmup_epochs, --layer_decay_type, --layer_decay, --weight_decay, --drop_path, --reprob,
# --mixup, --cutmix, --smoothing, --model_ema). Fine-tuning on 4 nodes x 8 GPUs at batch 32: total batch 1024.
TRAINING_MD_FINETUNING = {
    "atto": (32 * 4 * 8, 2e-4, 600, 0, "single", 0.9, 0.3, 0.1, 0.25, 0.0, 0.0, 0.2, True),
    "tiny": (32 * 4 * 8, 8e-4, 300, 40, "single", 0.9, 0.05, 0.2, 0.25, 0.8, 1.0, 0.1, True),
    "base": (32 * 4 * 8, 6.25e-4, 100, 20, "group", 0.6, 0.05, 0.1, 0.25, 0.8, 1.0, 0.1, True),
}
# Pre-training: base on 8 nodes x 8 GPUs at batch 64 (total 4096), --blr 1.5e-4, --epochs 1600, --warmup_epochs 40.
TRAINING_MD_PRETRAINING = {"base": (64 * 8 * 8, 1.5e-4, 1600, 40)}


def test_finetuning_recipes_are_training_md_side_by_side():
    for size, published in TRAINING_MD_FINETUNING.items():
        model_args, _, recipe, training = finetune_args(["--output_dir", "unused", "--recipe", size])
        applied = apply_recipe(size, FINETUNE_RECIPES, 1, "fine-tuning", model_args, recipe,
                               training)
        total = training.per_device_train_batch_size * training.gradient_accumulation_steps
        ours = (total, recipe.base_learning_rate, training.num_train_epochs, recipe.warmup_epochs,
                recipe.layer_decay_type, recipe.layer_decay, training.weight_decay, recipe.drop_path_rate,
                recipe.reprob, recipe.mixup, recipe.cutmix, training.label_smoothing_factor, recipe.model_ema)
        assert ours == published, (size, ours, published)
        assert model_args.model_preset == size and model_args.image_size == 224 and recipe.aa == "rand-m9-mstd0.5-inc1"
        assert applied.deviations == {}


def test_pretraining_recipe_is_training_md_and_unpublished_sizes_are_refused():
    model_args, _, args = pretrain_args(["--output_dir", "unused", "--recipe", "base"])
    apply_recipe("base", PRETRAIN_RECIPES, 8, "pre-training", model_args, args)
    ours = (args.per_device_train_batch_size * 8 * args.gradient_accumulation_steps, args.base_learning_rate,
            args.num_train_epochs, args.warmup_epochs)
    assert ours == TRAINING_MD_PRETRAINING["base"] and model_args.model_preset == "base"
    for size in ("atto", "tiny", "large"):
        with pytest.raises(ValueError, match="publishes pre-training recipes for base only"):
            check_recipe_name(size, PRETRAIN_RECIPES, "pre-training")
    with pytest.raises(ValueError, match="is not a recipe"):
        check_recipe_name("tiny-21k", FINETUNE_RECIPES, "fine-tuning")


def test_a_given_flag_wins_over_the_recipe_and_is_a_deviation():
    model_args, _, recipe, training = finetune_args(["--output_dir", "unused", "--recipe", "tiny",
                                                     "--drop_path_rate", "0.3", "--per_device_train_batch_size", "16"])
    applied = apply_recipe("tiny", FINETUNE_RECIPES, 2, "fine-tuning", model_args, recipe,
                           training)
    assert recipe.drop_path_rate == 0.3 and applied.deviations == {"drop_path_rate": 0.3,
                                                                  "per_device_train_batch_size": 16}
    assert training.gradient_accumulation_steps == 1024 // (16 * 2)  # the total batch stays the reference's
    with pytest.raises(ValueError, match="not a multiple"):
        model_args, _, recipe, training = finetune_args(["--output_dir", "unused", "--per_device_train_batch_size",
                                                         "24"])
        apply_recipe("tiny", FINETUNE_RECIPES, 1, "fine-tuning", model_args, recipe,
                     training)


def test_a_model_of_another_size_than_the_recipes_is_a_deviation():
    """`--recipe tiny` training an atto (from a start folder or `--config_overrides`): the card and log say so, with
    the architecture that was trained; the recipe's own size is no deviation."""
    model_args, _, recipe, training = finetune_args(["--output_dir", "unused", "--recipe", "tiny"])
    applied = apply_recipe("tiny", FINETUNE_RECIPES, 1, "fine-tuning", model_args, recipe,
                           training)
    note_model(applied, ConvNextV2Config.from_preset("tiny"))
    assert applied.deviations == {}
    note_model(applied, ConvNextV2Config.from_preset("atto"))
    assert applied.deviations == {"model": "depths [2, 2, 6, 2], widths [40, 80, 160, 320]"}
    assert "model depths [2, 2, 6, 2], widths [40, 80, 160, 320]" in card_lines(applied)["deviations from it"]


def test_run_finetune_with_the_atto_recipe_on_a_tiny_folder(tmp_path):
    """Every reference option on (RandAugment, erasing, EMA, layer decay, smoothing 0.2, drop path), at a size this
    machine can run: the size flags given are deviations, and the card says so."""
    images = make_image_folder(tmp_path / "images", per_class=6, corrupt=False)
    out = tmp_path / "out"
    result = run_as_user([sys.executable, str(REPO / "examples" / "classification" / "run_finetune.py"), "--recipe",
                          "atto", "--train_dir", str(images), "--output_dir", str(out), "--image_size", "32",
                          "--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "1", "--max_steps",
                          "2", "--eval_strategy", "no", "--save_strategy", "no", "--report_to", "none",
                          "--train_val_split", "0.25"], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "--recipe atto: image_size is 32 instead of the recipe's 224" in result.stderr
    card = (out / "README.md").read_text()
    for line in ("**RandAugment**: rand-m9-mstd0.5-inc1", "**random erasing**: 0.25 (pixel, 1x)", "**EMA**: True",
                 "**layer-wise lr decay**: 0.9 (single)", "**label smoothing**: 0.2", "**weight decay**: 0.3",
                 "**drop path**: 0.1", "**reference recipe**: atto",
                 "**deviations from it**: per_device_train_batch_size 4, image_size 32, total batch 4"):
        assert line in card, line
    assert (out / "ema" / "model.safetensors").is_file()


# The ConvNeXt V2 paper (arXiv 2301.00808), appendix A.2, transcribed row by row: (total batch, base lr, epochs,
# warm-up, layer decay type, layer decay, weight decay, drop path, mixup, cutmix, smoothing, EMA). Tables 9-11,
# ImageNet-1K fine-tuning; base and large print a base lr of 6.25e-3, which the recipes replace by TRAINING.md's
# 6.25e-4 (PAPER_MISPRINTS).
PAPER_IN1K = {
    "atto": (1024, 2e-4, 600, 0, "single", 0.9, 0.3, 0.1, 0.0, 0.0, 0.2, True),
    "femto": (1024, 2e-4, 600, 0, "single", 0.9, 0.05, 0.0, 0.3, 0.3, 0.2, True),
    "pico": (1024, 2e-4, 600, 0, "single", 0.9, 0.3, 0.0, 0.3, 0.3, 0.2, True),
    "nano": (1024, 2e-4, 600, 0, "single", 0.9, 0.3, 0.1, 0.5, 0.5, 0.2, True),
    "tiny": (1024, 8e-4, 300, 40, "single", 0.9, 0.05, 0.2, 0.8, 1.0, 0.1, True),
    "base": (1024, 6.25e-3, 100, 20, "group", 0.6, 0.05, 0.1, 0.8, 1.0, 0.1, True),
    "large": (1024, 6.25e-3, 100, 20, "group", 0.6, 0.05, 0.2, 0.8, 1.0, 0.1, True),
    "huge": (1024, 1.25e-3, 50, 10, "single", 0.75, 0.05, 0.3, 0.8, 1.0, 0.1, True),
}
PAPER_MISPRINTS = {"base": {1: 6.25e-4}, "large": {1: 6.25e-4}}
# Table 12, ImageNet-22K intermediate fine-tuning (drop path of nano and tiny illegible: None, given by the user).
PAPER_22K = {size: (4096, 2.5e-4, 90, 5, "single", decay, 0.05, drop_path, 0.8, 1.0, 0.1, False)
             for size, decay, drop_path in (("nano", 0.9, None), ("tiny", 0.9, None), ("base", 0.8, 0.1),
                                            ("large", 0.8, 0.1), ("huge", 0.8, 0.3))}
# Table 13, ImageNet-1K fine-tuning after 22K.
PAPER_22K_1K = {size: (512, 2.5e-5, epochs, 0, "single", decay, 1e-8, drop_path, 0.0, 0.0, 0.1, ema)
                for size, epochs, decay, drop_path, ema in (("nano", 90, 0.9, 0.1, True), ("tiny", 90, 0.9, 0.1, True),
                                                             ("base", 30, 0.8, 0.2, True), ("large", 30, 0.8, 0.3, True),
                                                             ("huge", 30, 0.85, 0.5, False))}


def recipe_as_row(name: str, drop_path: float | None = None):
    extra = [] if drop_path is None else ["--drop_path_rate", str(drop_path)]
    model_args, _, recipe, training = finetune_args(["--output_dir", "unused", "--recipe", name, *extra])
    applied = apply_recipe(name, FINETUNE_RECIPES, 1, "fine-tuning", model_args, recipe, training)
    total = training.per_device_train_batch_size * training.gradient_accumulation_steps
    row = (total, recipe.base_learning_rate, training.num_train_epochs, recipe.warmup_epochs, recipe.layer_decay_type,
           recipe.layer_decay, training.weight_decay, recipe.drop_path_rate, recipe.mixup, recipe.cutmix,
           training.label_smoothing_factor, recipe.model_ema)
    return row, applied, model_args, recipe


def test_every_recipe_name_resolves_to_the_papers_values_side_by_side():
    tables = [(name, row) for name, row in PAPER_IN1K.items()] + [(f"{s}-22k", r) for s, r in PAPER_22K.items()] + \
             [(f"{s}-22k-1k", r) for s, r in PAPER_22K_1K.items()]
    assert sorted(name for name, _ in tables) == sorted(FINETUNE_RECIPES)  # one table, every name in it
    for name, paper in tables:
        expected = list(paper)
        for column, value in PAPER_MISPRINTS.get(name, {}).items():
            expected[column] = value
        given = 0.15 if expected[7] is None else None  # the illegible drop path: the user's value
        ours, applied, model_args, recipe = recipe_as_row(name, given)
        expected[7] = given if expected[7] is None else expected[7]
        assert ours == tuple(expected), (name, ours, expected)
        assert model_args.model_preset == name.split("-")[0] and model_args.image_size == 224
        assert recipe.aa == "rand-m9-mstd0.5-inc1" and recipe.reprob == 0.25 and applied.deviations == {}
        source = card_lines(applied)["reference recipe"]
        assert ("paper alone" not in source) == (name in TRAINING_MD_FINETUNING), (name, source)
        assert ("prints 6.25e-3" in card_lines(applied).get("recipe notes", "")) == (name in PAPER_MISPRINTS)
    assert recipe_as_row("base-22k-1k")[3].ignore_mismatched_sizes  # a new 1000-class head replaces the 22K one


def test_a_recipe_the_paper_leaves_a_value_open_asks_for_it():
    model_args, _, recipe, training = finetune_args(["--output_dir", "unused", "--recipe", "tiny-22k"])
    with pytest.raises(ValueError, match=r"tiny-22k: the paper's Table 12 prints its drop path illegibly.*"
                                         r"give --drop_path_rate"):
        apply_recipe("tiny-22k", FINETUNE_RECIPES, 1, "fine-tuning", model_args, recipe, training)
