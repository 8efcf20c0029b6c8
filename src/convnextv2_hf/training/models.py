"""Building the model and processor an entry point starts from: a preset, an FCMAE or a classifier checkpoint."""

from __future__ import annotations

import os

import torch

from ..configuration_convnextv2 import ConvNextV2Config
from ..image_processing_convnextv2 import ConvNextV2ImageProcessor
from ..modeling_convnextv2 import ConvNextV2ForImageClassification, ConvNextV2ForMaskedImageModeling
from .arguments import parse_config_overrides


def training_processor(source: str | None, image_size: int, mask_cell_size: int, mask_ratio: float | None = None):
    """The processor saved in `source` if there is one, else the defaults; set to `image_size` and the mask cell."""
    if source and os.path.exists(os.path.join(source, "preprocessor_config.json")):
        processor = ConvNextV2ImageProcessor.from_pretrained(source)
    else:
        processor = ConvNextV2ImageProcessor()
    processor.size = {"shortest_edge": image_size}
    processor.mask_cell_size = mask_cell_size
    if mask_ratio is not None:
        processor.mask_ratio = mask_ratio
    return processor


def fcmae_overrides(model_args, args) -> dict:
    """Config fields set on the command line: `--config_overrides`, then the FCMAE flags that were given."""
    overrides = parse_config_overrides(model_args.config_overrides)
    for name in ("mask_ratio", "sparse_backend", "sparse_grn_scope", "mask_strategy"):
        if getattr(args, name, None) is not None:
            overrides[name] = getattr(args, name)
    overrides["norm_pix_loss"] = args.norm_pix_loss
    return overrides


def build_fcmae(model_args, args) -> tuple[ConvNextV2ForMaskedImageModeling, ConvNextV2ImageProcessor]:
    """The FCMAE model to pre-train (new from `--model_preset`, or continued from `--model_name_or_path`)."""
    overrides = fcmae_overrides(model_args, args)
    if model_args.model_name_or_path:
        config = ConvNextV2Config.from_pretrained(model_args.model_name_or_path, cache_dir=model_args.cache_dir,
                                                  **overrides)
        config.check_architecture()
        model = ConvNextV2ForMaskedImageModeling.from_pretrained(model_args.model_name_or_path, config=config,
                                                                 cache_dir=model_args.cache_dir)
    else:
        config = ConvNextV2Config.from_preset(model_args.model_preset, image_size=model_args.image_size, **overrides)
        model = ConvNextV2ForMaskedImageModeling(config)
    cell = config.mask_cell_size
    if model_args.image_size % cell:
        raise ValueError(f"--image_size {model_args.image_size} must be a multiple of the mask cell ({cell} px).")
    if getattr(args, "gradient_checkpointing", False):
        model.gradient_checkpointing_enable()
    processor = training_processor(model_args.image_processor_name or model_args.model_name_or_path,
                                   model_args.image_size, cell, config.mask_ratio)
    return model, processor


def load_classifier(model_args, recipe, labels: list[str]) -> tuple[ConvNextV2ForImageClassification, bool]:
    """Classifier with `len(labels)` classes from an FCMAE or classifier checkpoint, or a new preset model.

    Returns the model and whether its head is new (then it is re-initialised small by [`init_head_small`]).
    """
    id2label = dict(enumerate(labels))
    label_kwargs = dict(num_labels=len(labels), id2label=id2label, label2id={v: k for k, v in id2label.items()})
    overrides = parse_config_overrides(model_args.config_overrides) | {"drop_path_rate": recipe.drop_path_rate}
    if model_args.model_name_or_path is None:
        config = ConvNextV2Config.from_preset(model_args.model_preset, image_size=model_args.image_size,
                                              **overrides, **label_kwargs)
        return ConvNextV2ForImageClassification(config), True
    config = ConvNextV2Config.from_pretrained(model_args.model_name_or_path, cache_dir=model_args.cache_dir)
    from_fcmae = "ConvNextV2ForMaskedImageModeling" in (config.architectures or [])
    has_head = not from_fcmae and bool(config.architectures) and "ForImageClassification" in config.architectures[0]
    if has_head and config.num_labels != len(labels) and not recipe.ignore_mismatched_sizes:
        raise ValueError(
            f"{model_args.model_name_or_path} classifies {config.num_labels} classes but the dataset has {len(labels)}; "
            "pass --ignore_mismatched_sizes to train a new head."
        )
    same_head = has_head and config.num_labels == len(labels)
    for key, value in overrides.items():
        setattr(config, key, value)
    if not same_head:
        config.num_labels, config.id2label, config.label2id = (
            label_kwargs["num_labels"], label_kwargs["id2label"], label_kwargs["label2id"])
    model = ConvNextV2ForImageClassification.from_pretrained(
        model_args.model_name_or_path, config=config, ignore_mismatched_sizes=recipe.ignore_mismatched_sizes,
        cache_dir=model_args.cache_dir,
    )
    return model, not same_head


def init_head_small(model, scale: float) -> None:
    """Re-initialise the classifier at std 0.02 * `scale` with zero bias (the reference fine-tuning head)."""
    with torch.no_grad():
        torch.nn.init.trunc_normal_(model.classifier.weight, std=0.02)
        model.classifier.weight.mul_(scale)
        model.classifier.bias.zero_()
