"""Our scripts' defaults against the reference repository's own scripts, side by side.

Each row: (what, the reference's value and where it is set, ours as the scripts resolve it with no flags).
"""

import torch
from transformers import TrainingArguments

from convnextv2_hf import ConvNextV2Config, ConvNextV2ForMaskedImageModeling, ConvNextV2ImageProcessor
from convnextv2_hf.training.arguments import REFERENCE_TRAINER_DEFAULTS
from convnextv2_hf.training.fcmae_engine import TrainingPlan
from convnextv2_hf.training.finetune import parse_args as finetune_args
from convnextv2_hf.training.models import fcmae_overrides
from convnextv2_hf.training.optim import param_groups
from convnextv2_hf.training.pretrain import parse_args as pretrain_args


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
        ("seed", 0, training.seed),
        ("checkpoints kept (--save_ckpt_num)", 3, training.save_total_limit),
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
