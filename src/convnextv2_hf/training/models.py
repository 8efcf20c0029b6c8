"""Building the model and processor an entry point starts from: a preset, an FCMAE or a classifier checkpoint."""

from __future__ import annotations

import logging
import os
from dataclasses import MISSING

import torch

from ..configuration_convnextv2 import ConvNextV2Config
from ..image_processing_convnextv2 import ConvNextV2ImageProcessor
from ..masking import num_visible_cells
from ..modeling_convnextv2 import ConvNextV2ForImageClassification, ConvNextV2ForMaskedImageModeling
from .arguments import merge_flag_into_overrides, parse_config_overrides
from ..weights import load_checked

logger = logging.getLogger(__name__)


def training_processor(source: str | None, image_size: int, mask_cell_size: int, mask_ratio: float | None = None):
    """The processor saved in `source` if there is one, else the defaults; set to `image_size` and the mask cell."""
    settings = os.path.join(source or "", "preprocessor_config.json")
    if source and os.path.exists(settings):
        try:
            processor = ConvNextV2ImageProcessor.from_pretrained(source)
        except ValueError as error:
            raise ValueError(f"{settings}: {error} Fix the file, or pass --image_processor_name.") from None
    else:
        processor = ConvNextV2ImageProcessor()
    processor.size = {"shortest_edge": image_size}
    processor.mask_cell_size = mask_cell_size
    if mask_ratio is not None:
        processor.mask_ratio = mask_ratio
    return processor


def fcmae_overrides(model_args, args) -> dict:
    """Config fields set on the command line: `--config_overrides` and the FCMAE flags that were given (the two
    must agree). A new model gets `norm_pix_loss=True` (the reference default) unless told otherwise; a checkpoint
    keeps the objective it was trained with."""
    overrides = parse_config_overrides(model_args.config_overrides)
    for name in ("mask_ratio", "sparse_backend", "sparse_grn_scope", "mask_strategy"):
        if getattr(args, name, None) is not None:
            merge_flag_into_overrides(overrides, args, name)
    new_model = not model_args.model_name_or_path
    merge_flag_into_overrides(overrides, args, "norm_pix_loss", args.norm_pix_loss if new_model else MISSING)
    return overrides


def build_fcmae(model_args, args) -> tuple[ConvNextV2ForMaskedImageModeling, ConvNextV2ImageProcessor]:
    """The FCMAE model to pre-train (new from `--model_preset`, or continued from `--model_name_or_path`)."""
    overrides = fcmae_overrides(model_args, args)
    source = model_args.model_name_or_path
    if source:
        config = ConvNextV2Config.from_pretrained(source, cache_dir=model_args.cache_dir, **overrides)
        config.check_architecture()
        model = load_checked(ConvNextV2ForMaskedImageModeling, source, config, model_args.cache_dir)
    else:
        config = ConvNextV2Config.from_preset(model_args.model_preset, image_size=model_args.image_size, **overrides)
        model = ConvNextV2ForMaskedImageModeling(config)
    cell = config.mask_cell_size
    if model_args.image_size % cell:
        raise ValueError(f"--image_size {model_args.image_size} must be a multiple of the mask cell ({cell} px).")
    cells = (model_args.image_size // cell) ** 2
    if num_visible_cells(cells, config.mask_ratio) == 0:  # the ratio is above 0: some cell is always masked
        raise ValueError(f"--image_size {model_args.image_size} gives {cells} mask cell(s) of {cell} px, and mask ratio "
                         f"{config.mask_ratio} leaves none visible; pass a larger --image_size (a multiple of {cell}) "
                         "or a lower --mask_ratio.")
    if getattr(args, "gradient_checkpointing", False):  # the older name warns from transformers 5.2x on
        (getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable)()
    processor = training_processor(model_args.image_processor_name or source, model_args.image_size, cell,
                                   config.mask_ratio)
    return model, processor


def load_classifier(model_args, recipe, labels: list[str]) -> tuple[ConvNextV2ForImageClassification, bool]:
    """Classifier with `labels` (the data's classes, in the data's order) from an FCMAE or classifier checkpoint, or
    a new preset model.

    A checkpoint's head is kept when it classifies the same classes (its rows put in the data's order, names from
    the data); otherwise the head is new. Returns the model and whether its head is new (then it is re-initialised
    small by [`init_head_small`]).
    """
    id2label = dict(enumerate(labels))
    label_kwargs = dict(num_labels=len(labels), id2label=id2label, label2id={v: k for k, v in id2label.items()})
    overrides = parse_config_overrides(model_args.config_overrides)
    merge_flag_into_overrides(overrides, recipe, "drop_path_rate", recipe.drop_path_rate)
    recipe.drop_path_rate = overrides["drop_path_rate"]  # what the card reports
    source = model_args.model_name_or_path
    if source is None:
        config = ConvNextV2Config.from_preset(model_args.model_preset, image_size=model_args.image_size,
                                              **overrides, **label_kwargs)
        return ConvNextV2ForImageClassification(config), True
    config = ConvNextV2Config.from_pretrained(source, cache_dir=model_args.cache_dir)
    from_fcmae = "ConvNextV2ForMaskedImageModeling" in (config.architectures or [])
    has_head = not from_fcmae and bool(config.architectures) and "ForImageClassification" in config.architectures[0]
    if has_head and config.num_labels != len(labels) and not recipe.ignore_mismatched_sizes:
        raise ValueError(f"{source} classifies {config.num_labels} classes but the dataset has {len(labels)}; "
                         "pass --ignore_mismatched_sizes to train a new head.")
    rows = head_rows([config.id2label[i] for i in range(config.num_labels)] if has_head else None, labels, source)
    for key, value in (overrides | label_kwargs).items():
        setattr(config, key, value)
    new_parts = ("classifier.",) + (("convnextv2.layernorm.",) if from_fcmae else ())
    model = load_checked(ConvNextV2ForImageClassification, source, config, model_args.cache_dir, new_parts,
                         ignore_mismatched_sizes=recipe.ignore_mismatched_sizes)
    if rows is not None:
        with torch.no_grad():
            model.classifier.weight.copy_(model.classifier.weight[rows].clone())
            model.classifier.bias.copy_(model.classifier.bias[rows].clone())
    return model, rows is None


def head_rows(head_labels: list[str] | None, labels: list[str], source: str) -> list[int] | None:
    """For each of the data's classes, the row of the checkpoint's head that classifies it; None when the head
    classifies other classes (or there is none) and a new one is trained. Unnamed heads (transformers' `LABEL_i`)
    are taken in order."""
    if head_labels is None or len(head_labels) != len(labels):
        return None
    head_labels = [str(name) for name in head_labels]
    if head_labels == [f"LABEL_{i}" for i in range(len(labels))]:
        return list(range(len(labels)))
    if sorted(head_labels) != sorted(map(str, labels)):
        logger.warning("%s classifies %s, the data has %s: a new head is trained for the data's classes.", source,
                       ", ".join(head_labels[:5]), ", ".join(map(str, labels[:5])))
        return None
    return [head_labels.index(str(name)) for name in labels]


def init_head_small(model, scale: float) -> None:
    """Re-initialise the classifier at std 0.02 * `scale` with zero bias (the reference fine-tuning head)."""
    with torch.no_grad():
        torch.nn.init.trunc_normal_(model.classifier.weight, std=0.02)
        model.classifier.weight.mul_(scale)
        model.classifier.bias.zero_()


def gathered_model(accelerator, prepared_model):
    """The trained model as one whole module on the main process (None elsewhere). Under FSDP every process holds a
    shard, so all of them must call this: the full weights are gathered into a new unsharded copy."""
    from accelerate.utils import DistributedType

    model = accelerator.unwrap_model(prepared_model, keep_torch_compile=False)
    if accelerator.distributed_type != DistributedType.FSDP:
        return model if accelerator.is_main_process else None
    weights = accelerator.get_state_dict(prepared_model)
    if not accelerator.is_main_process:
        return None
    whole = type(model)(model.config)
    whole.load_state_dict(weights)
    return whole.eval()
