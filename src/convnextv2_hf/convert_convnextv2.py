"""Checkpoint conversion between this package and the reference repository's and timm's layouts.

Our layout is transformers' ConvNeXt V2 layout. Each foreign layout is a list of [`Rule`]s, each naming one of
our keys and the matching foreign key, with the tensor transform each way; the same rules serve import and export,
so the two directions cannot drift apart.

Command line: `convnextv2-hf convert --from {reference,timm,transformers} --checkpoint PATH --output_dir DIR`
and `convnextv2-hf export --to {reference,timm} --model_name_or_path DIR --output FILE`.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from .configuration_convnextv2 import ConvNextV2Config
from .outputs.cards import check_license
from .sparse_ops import dense_conv_to_sparse, dense_dwconv_to_sparse, sparse_conv_to_dense, sparse_dwconv_to_dense

StateDict = dict[str, torch.Tensor]
LAYOUTS = ("reference", "timm", "transformers")


def _same(t: torch.Tensor) -> torch.Tensor:
    return t


def row_to_flat(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1)


def flat_to_row(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(1, -1)


def to_grn_shape(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(1, 1, 1, -1)


def conv1x1_to_linear(t: torch.Tensor) -> torch.Tensor:
    """timm's small sizes keep MLP weights as 1x1 convolutions `(out, in, 1, 1)`; ours are Linear `(out, in)`."""
    return t.reshape(t.shape[0], t.shape[1]) if t.dim() == 4 else t


def linear_to_conv1x1(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(*t.shape, 1, 1)


@dataclass(frozen=True)
class Rule:
    """`ours` <-> `theirs` key templates (`{i}`, `{j}`, `{k}` digits, `{p}` weight/bias) and tensor transforms."""

    ours: str
    theirs: str
    to_ours: Callable[[torch.Tensor], torch.Tensor] = _same
    to_theirs: Callable[[torch.Tensor], torch.Tensor] = _same

    @staticmethod
    def _regex(template: str) -> re.Pattern:
        pattern = re.escape(template)
        for name in "ijk":
            pattern = pattern.replace(re.escape("{" + name + "}"), f"(?P<{name}>[0-9]+)")
        pattern = pattern.replace(re.escape("{p}"), "(?P<p>weight|bias)")
        return re.compile(f"^{pattern}$")

    def match(self, key: str, source: str) -> dict[str, str] | None:
        found = self._regex(self.ours if source == "ours" else self.theirs).match(key)
        return found.groupdict() if found else None


ENC = "convnextv2.encoder.stages.{i}"
BLOCK = ENC + ".layers.{j}"

REFERENCE_CLASSIFIER_RULES = [
    Rule("convnextv2.embeddings.patch_embeddings.{p}", "downsample_layers.0.0.{p}"),
    Rule("convnextv2.embeddings.layernorm.{p}", "downsample_layers.0.1.{p}"),
    Rule(ENC + ".downsampling_layer.{k}.{p}", "downsample_layers.{i}.{k}.{p}"),
    Rule(BLOCK + ".dwconv.{p}", "stages.{i}.{j}.dwconv.{p}"),
    Rule(BLOCK + ".layernorm.{p}", "stages.{i}.{j}.norm.{p}"),
    Rule(BLOCK + ".pwconv1.{p}", "stages.{i}.{j}.pwconv1.{p}"),
    Rule(BLOCK + ".grn.weight", "stages.{i}.{j}.grn.gamma"),
    Rule(BLOCK + ".grn.bias", "stages.{i}.{j}.grn.beta"),
    Rule(BLOCK + ".pwconv2.{p}", "stages.{i}.{j}.pwconv2.{p}"),
    Rule("convnextv2.layernorm.{p}", "norm.{p}"),
    Rule("classifier.{p}", "head.{p}"),
]

DECODER_BLOCK = "decoder.layers.{j}"
REFERENCE_FCMAE_RULES = [
    Rule("convnextv2.embeddings.patch_embeddings.{p}", "encoder.downsample_layers.0.0.{p}"),
    Rule("convnextv2.embeddings.layernorm.{p}", "encoder.downsample_layers.0.1.{p}"),
    Rule(ENC + ".downsampling_layer.0.{p}", "encoder.downsample_layers.{i}.0.ln.{p}"),
    Rule(ENC + ".downsampling_layer.1.weight", "encoder.downsample_layers.{i}.1.kernel",
         sparse_conv_to_dense, dense_conv_to_sparse),
    Rule(ENC + ".downsampling_layer.1.bias", "encoder.downsample_layers.{i}.1.bias", row_to_flat, flat_to_row),
    Rule(BLOCK + ".dwconv.weight", "encoder.stages.{i}.{j}.dwconv.kernel", sparse_dwconv_to_dense, dense_dwconv_to_sparse),
    Rule(BLOCK + ".dwconv.bias", "encoder.stages.{i}.{j}.dwconv.bias", row_to_flat, flat_to_row),
    Rule(BLOCK + ".layernorm.{p}", "encoder.stages.{i}.{j}.norm.ln.{p}"),
    Rule(BLOCK + ".pwconv1.{p}", "encoder.stages.{i}.{j}.pwconv1.linear.{p}"),
    Rule(BLOCK + ".grn.weight", "encoder.stages.{i}.{j}.grn.gamma", to_grn_shape, flat_to_row),
    Rule(BLOCK + ".grn.bias", "encoder.stages.{i}.{j}.grn.beta", to_grn_shape, flat_to_row),
    Rule(BLOCK + ".pwconv2.{p}", "encoder.stages.{i}.{j}.pwconv2.linear.{p}"),
    Rule("decoder.proj.{p}", "proj.{p}"),
    Rule("decoder.mask_token", "mask_token"),
    Rule(DECODER_BLOCK + ".dwconv.{p}", "decoder.{j}.dwconv.{p}"),
    Rule(DECODER_BLOCK + ".layernorm.{p}", "decoder.{j}.norm.{p}"),
    Rule(DECODER_BLOCK + ".pwconv1.{p}", "decoder.{j}.pwconv1.{p}"),
    Rule(DECODER_BLOCK + ".grn.weight", "decoder.{j}.grn.gamma"),
    Rule(DECODER_BLOCK + ".grn.bias", "decoder.{j}.grn.beta"),
    Rule(DECODER_BLOCK + ".pwconv2.{p}", "decoder.{j}.pwconv2.{p}"),
    Rule("decoder.pred.{p}", "pred.{p}"),
]

TIMM_RULES = [
    Rule("convnextv2.embeddings.patch_embeddings.{p}", "stem.0.{p}"),
    Rule("convnextv2.embeddings.layernorm.{p}", "stem.1.{p}"),
    Rule(ENC + ".downsampling_layer.{k}.{p}", "stages.{i}.downsample.{k}.{p}"),
    Rule(BLOCK + ".dwconv.{p}", "stages.{i}.blocks.{j}.conv_dw.{p}"),
    Rule(BLOCK + ".layernorm.{p}", "stages.{i}.blocks.{j}.norm.{p}"),
    Rule(BLOCK + ".pwconv1.weight", "stages.{i}.blocks.{j}.mlp.fc1.weight", conv1x1_to_linear),
    Rule(BLOCK + ".pwconv1.bias", "stages.{i}.blocks.{j}.mlp.fc1.bias"),
    Rule(BLOCK + ".grn.{p}", "stages.{i}.blocks.{j}.mlp.grn.{p}", to_grn_shape, row_to_flat),
    Rule(BLOCK + ".pwconv2.weight", "stages.{i}.blocks.{j}.mlp.fc2.weight", conv1x1_to_linear),
    Rule(BLOCK + ".pwconv2.bias", "stages.{i}.blocks.{j}.mlp.fc2.bias"),
    Rule("convnextv2.layernorm.{p}", "head.norm.{p}"),
    Rule("classifier.{p}", "head.fc.{p}"),
]
# timm builds atto, femto, pico and nano (`conv_mlp=True`) with 1x1-convolution MLP weights.
TIMM_CONV_MLP_RULES = [
    Rule(rule.ours, rule.theirs, rule.to_ours, linear_to_conv1x1) if ".mlp.fc" in rule.theirs and "weight" in rule.theirs
    else rule for rule in TIMM_RULES
]
TIMM_CONV_MLP_WIDTHS = {(40, 80, 160, 320), (48, 96, 192, 384), (64, 128, 256, 512), (80, 160, 320, 640)}


def timm_uses_conv_mlp(config: ConvNextV2Config) -> bool:
    """Whether timm builds this architecture with 1x1-convolution MLPs: its atto, femto, pico and nano widths."""
    return tuple(config.hidden_sizes) in TIMM_CONV_MLP_WIDTHS


def rename(state_dict: StateDict, rules: list[Rule], source: str) -> StateDict:
    """Map every key of `state_dict` through the first matching rule; unknown keys raise, naming them all."""
    converted, unknown = {}, []
    for key, tensor in state_dict.items():
        for rule in rules:
            groups = rule.match(key, source)
            if groups is not None:
                if source == "theirs":
                    converted[rule.ours.format(**groups)] = rule.to_ours(tensor)
                else:
                    converted[rule.theirs.format(**groups)] = rule.to_theirs(tensor)
                break
        else:
            unknown.append(key)
    if unknown:
        raise KeyError(f"{len(unknown)} key(s) match no known layout rule: {', '.join(sorted(unknown))}")
    return converted


# --------------------------------------------------------------------------------------------- loading


def resolve_checkpoint_file(path: str | os.PathLike) -> Path:
    """The weights file behind `path`: the file itself, or a folder's `model.safetensors` / `pytorch_model.bin`."""
    path = Path(path)
    if path.is_dir():
        for name in ("model.safetensors", "pytorch_model.bin"):
            if (path / name).exists():
                return path / name
        raise FileNotFoundError(f"--checkpoint {str(path)!r} is a folder without model.safetensors or pytorch_model.bin.")
    if not path.exists():
        raise FileNotFoundError(f"--checkpoint {str(path)!r} does not exist.")
    if path.stat().st_size == 0:
        raise ValueError(f"--checkpoint {str(path)!r} is empty (0 bytes); the download or copy did not finish.")
    return path


def read_checkpoint_file(path: Path):
    """Safetensors directly, else `torch.load(weights_only=True)`: no pickled code ever runs."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as error:  # safetensors reports damage with several exception types
            raise ValueError(f"--checkpoint {str(path)!r} is not a readable safetensors file ({error}).") from None
    with open(path, "rb") as handle:
        head = handle.read(2)
    if head != b"PK" and head[:1] != b"\x80":  # torch.save writes a zip archive; old files are pickles
        raise ValueError(f"--checkpoint {str(path)!r} is not a PyTorch checkpoint (neither a zip archive nor a pickle); "
                         "pass the .pth/.pt/.bin/.safetensors file the weights were saved to.")
    # Reference training checkpoints also store their argparse arguments; allow that inert container only.
    with torch.serialization.safe_globals([argparse.Namespace]):
        try:
            return torch.load(str(path), map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as error:
            if "Weights only load failed" not in str(error):
                raise ValueError(f"--checkpoint {str(path)!r} is not a PyTorch checkpoint ({error}).") from None
            raise ValueError(
                f"{path} needs arbitrary Python objects to load, and loading it would execute pickled code, which "
                f"this converter refuses. Re-save only its tensors (e.g. torch.save(ckpt['model'], 'weights.pth')) "
                f"in a trusted environment. Details: {str(error).splitlines()[0]}"
            ) from None
        except (EOFError, KeyError, RuntimeError, OSError) as error:
            detail = str(error).splitlines()[0] if str(error) else type(error).__name__
            raise ValueError(f"--checkpoint {str(path)!r} is not a readable PyTorch checkpoint: the file is damaged or "
                             f"truncated ({detail}).") from None


def load_state_dict(path: str | os.PathLike) -> StateDict:
    """Read a checkpoint without executing pickled code: safetensors directly, else `torch.load(weights_only=True)`.

    Unwraps `{'model': ...}`, `{'state_dict': ...}` and `{'model_ema': ...}` containers and drops a DDP `module.`
    prefix. A directory is read through its `model.safetensors` / `pytorch_model.bin`. Damaged, empty or foreign
    files raise a `ValueError` that names them.
    """
    return load_checkpoint(path)[0]


def load_checkpoint(path: str | os.PathLike) -> tuple[StateDict, dict]:
    """[`load_state_dict`], and the training settings the checkpoint records (see [`recorded_settings`])."""
    file = resolve_checkpoint_file(path)
    obj = read_checkpoint_file(file)
    settings = recorded_settings(path, obj)
    origin = read_origin(file, obj)
    if origin and "id2label" in origin:
        settings.setdefault("id2label", {int(k): v for k, v in origin["id2label"].items()})
    settings["origin"] = None if origin is None else {k: origin[k] for k in ("license", "base_model") if origin.get(k)}
    for container in ("model", "state_dict", "model_ema"):
        if isinstance(obj, dict) and container in obj and isinstance(obj[container], dict):
            obj = obj[container]
            break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{file} does not hold a state dict of tensors.")
    return {k.removeprefix("module."): v for k, v in obj.items()}, settings


# Fields a converted config takes from the source, beyond what the tensor shapes tell.
# What `export` records of its source folder beside the weights (a JSON string: a safetensors metadata value, or a
# key of the reference checkpoint's dict), so that converting the file back restores it.
ORIGIN_KEY = "convnextv2_hf"


def origin_record(model, card: dict) -> str:
    """The labels of a classifier (unless transformers' defaults) and the licence and base model of its card."""
    record = {key: card[key] for key in ("license", "base_model") if card.get(key)}
    id2label = getattr(model.config, "id2label", None) or {}
    if "classifier.weight" in model.state_dict() and any(v != f"LABEL_{k}" for k, v in id2label.items()):
        record["id2label"] = {str(k): v for k, v in id2label.items()}
    return json.dumps(record)


def read_origin(file: Path, obj) -> dict | None:
    """What an export of ours recorded (see [`origin_record`]); None for other checkpoints."""
    if file.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(file), framework="pt") as handle:
            text = (handle.metadata() or {}).get(ORIGIN_KEY)
    else:
        text = obj.get(ORIGIN_KEY) if isinstance(obj, dict) else None
    try:
        record = json.loads(text) if isinstance(text, str) else None
    except ValueError:
        return None
    return record if isinstance(record, dict) else None


CARRIED_FIELDS = ("id2label", "label2id", "layer_norm_eps", "image_size", "norm_pix_loss", "mask_ratio",
                  "drop_path_rate", "sparse_grn_scope", "mask_strategy", "problem_type")


def recorded_settings(path: str | os.PathLike, obj) -> dict:
    """Config fields the source records: a transformers folder's `config.json`; a reference training checkpoint's
    `args` (its `input_size`, `norm_pix_loss`, `mask_ratio`)."""
    config_file = Path(path, "config.json")
    if config_file.is_file():
        recorded = json.loads(config_file.read_text())
        settings = {key: recorded[key] for key in CARRIED_FIELDS if key in recorded}
        if "id2label" in settings:
            settings["id2label"] = {int(k): v for k, v in settings["id2label"].items()}
        return settings
    args = obj.get("args") if isinstance(obj, dict) else None
    args = vars(args) if isinstance(args, argparse.Namespace) else args  # the reference's; ours export a dict
    if not isinstance(args, dict):
        return {}
    names = {"input_size": "image_size", "norm_pix_loss": "norm_pix_loss", "mask_ratio": "mask_ratio",
             "layer_norm_eps": "layer_norm_eps"}
    return {ours: args[theirs] for theirs, ours in names.items() if theirs in args}


def check_weights(state_dict: StateDict, source: str | os.PathLike) -> None:
    """Every weight must be floating point and finite; the first offender is named."""
    for key, tensor in state_dict.items():
        if not tensor.is_floating_point():
            raise ValueError(f"{source}: weight {key} has dtype {tensor.dtype}; checkpoints hold floating-point weights "
                             "(an integer tensor would be converted into nonsense).")
        if not torch.isfinite(tensor).all():
            raise ValueError(f"{source}: weight {key} holds NaN or infinite values; the checkpoint is damaged.")


def detect_layout(state_dict: StateDict) -> str:
    """Guess the layout: `reference_fcmae`, `reference`, `timm` or `transformers`."""
    keys = set(state_dict)
    if any(k.startswith("encoder.downsample_layers.") for k in keys):
        return "reference_fcmae"
    if any(k.startswith("downsample_layers.") for k in keys):
        return "reference"
    if any(k.startswith("stem.") for k in keys):
        return "timm"
    if any(k.startswith("convnextv2.") for k in keys):
        return "transformers"
    raise ValueError(f"Unrecognised checkpoint layout; first keys: {sorted(keys)[:5]}")


def to_our_layout(state_dict: StateDict, layout: str) -> StateDict:
    """Convert a foreign state dict (see [`detect_layout`]) to our key names and tensor shapes."""
    if layout == "transformers":
        return {k: v for k, v in state_dict.items() if not k.endswith("num_batches_tracked")}
    rules = {"reference": REFERENCE_CLASSIFIER_RULES, "reference_fcmae": REFERENCE_FCMAE_RULES, "timm": TIMM_RULES}
    return rename(state_dict, rules[layout], source="theirs")


def from_our_layout(state_dict: StateDict, layout: str) -> StateDict:
    """Our state dict in a foreign layout: `reference` (classifier), `reference_fcmae`, `timm` or `timm_conv_mlp`
    (timm's atto to nano)."""
    rules = {"reference": REFERENCE_CLASSIFIER_RULES, "reference_fcmae": REFERENCE_FCMAE_RULES, "timm": TIMM_RULES,
             "timm_conv_mlp": TIMM_CONV_MLP_RULES}
    return rename(state_dict, rules[layout], source="ours")


def infer_config(state_dict: StateDict, **overrides) -> ConvNextV2Config:
    """Depths, widths, stem, classes and decoder size from the tensor shapes of a state dict in our layout."""
    block = re.compile(r"^convnextv2\.encoder\.stages\.(\d+)\.layers\.(\d+)\.dwconv\.weight$")
    depths: dict[int, int] = {}
    widths: dict[int, int] = {}
    for key, tensor in state_dict.items():
        found = block.match(key)
        if found:
            stage, layer = int(found.group(1)), int(found.group(2))
            depths[stage] = max(depths.get(stage, 0), layer + 1)
            widths[stage] = tensor.shape[0]
    if not depths or sorted(depths) != list(range(len(depths))):
        raise ValueError(f"Could not find the blocks of every stage; found stages {sorted(depths)}.")
    stem = state_dict["convnextv2.embeddings.patch_embeddings.weight"]
    kwargs = dict(
        depths=[depths[i] for i in sorted(depths)],
        hidden_sizes=[widths[i] for i in sorted(widths)],
        num_stages=len(depths),
        num_channels=stem.shape[1],
        patch_size=stem.shape[-1],
        layer_norm_eps=1e-6,
        use_grn=any(".grn." in k for k in state_dict),
    )
    if "classifier.weight" in state_dict:
        kwargs["num_labels"] = state_dict["classifier.weight"].shape[0]
    if "decoder.proj.weight" in state_dict:
        kwargs["decoder_hidden_size"] = state_dict["decoder.proj.weight"].shape[0]
        kwargs["decoder_depth"] = len({k.split(".")[2] for k in state_dict if k.startswith("decoder.layers.")})
    kwargs.update(overrides)
    config = ConvNextV2Config(**kwargs)
    if "decoder.pred.weight" in state_dict:
        outputs = state_dict["decoder.pred.weight"].shape[0]
        if outputs != config.mask_cell_size**2 * config.num_channels:
            raise ValueError(
                f"decoder.pred predicts {outputs} values per cell, but a {config.mask_cell_size}-px cell with "
                f"{config.num_channels} channels needs {config.mask_cell_size**2 * config.num_channels}."
            )
    return config


def build_model(state_dict: StateDict, config: ConvNextV2Config, task: str):
    """Instantiate our model for `task` (`fcmae` or `classification`) and load `state_dict`, strictly.

    For `classification` from an FCMAE checkpoint the decoder is dropped and the final norm and head are new.
    Missing and unexpected keys are reported by name; a shape mismatch names the tensor.
    """
    from .modeling_convnextv2 import ConvNextV2ForImageClassification, ConvNextV2ForMaskedImageModeling

    model_class = ConvNextV2ForMaskedImageModeling if task == "fcmae" else ConvNextV2ForImageClassification
    model = model_class(config)
    expected = model.state_dict()
    if task == "classification":
        state_dict = {k: v for k, v in state_dict.items() if not k.startswith("decoder.")}
    unexpected = sorted(set(state_dict) - set(expected))
    missing = sorted(set(expected) - set(state_dict))
    allowed_missing = set()
    if task == "classification" and not any(k.startswith("classifier.") for k in state_dict):
        allowed_missing = {"classifier.weight", "classifier.bias", "convnextv2.layernorm.weight", "convnextv2.layernorm.bias"}
    if unexpected or set(missing) - allowed_missing:
        raise KeyError(
            f"Checkpoint does not fit {model_class.__name__}: missing {sorted(set(missing) - allowed_missing)}, "
            f"unexpected {unexpected}."
        )
    for key, tensor in state_dict.items():
        if tuple(tensor.shape) != tuple(expected[key].shape):
            raise ValueError(f"Shape mismatch for {key}: checkpoint {tuple(tensor.shape)}, model {tuple(expected[key].shape)}.")
    model.load_state_dict(state_dict, strict=False)
    return model


def convert_checkpoint(
    checkpoint: str | os.PathLike,
    source: str,
    output_dir: str | os.PathLike | None = None,
    task: str = "auto",
    id2label: dict[int, str] | None = None,
    push_to_hub: bool = False,
    hub_model_id: str | None = None,
    hub_token: str | None = None,
    license: str | None = None,
):
    """Convert a reference, timm or transformers checkpoint into our model; save it when `output_dir` is given.

    `task="auto"` gives [`ConvNextV2ForMaskedImageModeling`] for FCMAE checkpoints (decoder included, so
    pre-training can continue) and [`ConvNextV2ForImageClassification`] otherwise; `task="classification"` on an
    FCMAE checkpoint gives a classifier with the pre-trained encoder, ready for fine-tuning. The saved folder gets a
    card naming the source and its licence (`license`, else the source's: CC-BY-NC 4.0 for the reference's and
    timm's ConvNeXt V2 weights, a transformers folder's own card).
    """
    if source not in LAYOUTS:
        raise ValueError(f"`source` must be one of {LAYOUTS}, got {source!r}.")
    foreign, settings = load_checkpoint(checkpoint)
    origin = settings.pop("origin")
    check_weights(foreign, checkpoint)
    layout = detect_layout(foreign)
    if layout.split("_")[0] != source:
        raise ValueError(f"{checkpoint} looks like a {layout} checkpoint, not {source}.")
    ours = to_our_layout(foreign, layout)
    has_decoder = "decoder.proj.weight" in ours
    if task == "auto":
        task = "fcmae" if has_decoder else "classification"
    if task not in ("fcmae", "classification"):
        raise ValueError(f"`task` must be auto, fcmae or classification, got {task!r}.")
    if task == "fcmae" and not has_decoder:
        raise ValueError("This checkpoint has no FCMAE decoder; use task='classification'.")
    config = infer_config(ours, **converted_settings(settings, ours, task, id2label))
    model = build_model(ours, config, task)
    if output_dir is not None:
        card = conversion_card(model, checkpoint, source, "classifier.weight" in ours, license,
                               hub_model_id or Path(output_dir).resolve().name, origin)
        save_converted(model, config, output_dir, card)
        if push_to_hub:
            from .hub import push_folder_to_hub

            push_folder_to_hub(output_dir, hub_model_id or Path(output_dir).name, hub_token)
    return model


def converted_settings(settings: dict, ours: StateDict, task: str, id2label: dict[int, str] | None) -> dict:
    """The config fields a conversion keeps: what the source records, `--id2label` (which must name every class of
    the head), and for FCMAE the reference's pixel-normalised loss unless the source says otherwise."""
    settings = dict(settings)
    classes = ours["classifier.weight"].shape[0] if "classifier.weight" in ours else None
    if id2label is not None:
        if classes is not None and sorted(id2label) != list(range(classes)):
            raise ValueError(f"--id2label must name classes 0..{classes - 1} (the checkpoint's head), got ids "
                             f"{sorted(id2label)[:10]}.")
        settings["id2label"] = {int(k): v for k, v in id2label.items()}
    if "id2label" in settings:
        if classes is not None and len(settings["id2label"]) != classes or task == "fcmae":
            settings.pop("id2label")
        else:
            settings["label2id"] = {v: k for k, v in settings["id2label"].items()}
    if task == "fcmae":
        settings.setdefault("norm_pix_loss", True)  # main_pretrain.py's default
    return settings


SOURCES = {"reference": "the reference repository (facebookresearch/ConvNeXt-V2)",
           "timm": "timm (huggingface/pytorch-image-models)", "transformers": "a transformers ConvNeXt V2 folder"}
# The reference repository's weights are licensed CC-BY-NC 4.0 (its LICENSE); timm's ConvNeXt V2 weights are those
# weights converted and carry the same licence.
WEIGHT_LICENSES = {"reference": "cc-by-nc-4.0", "timm": "cc-by-nc-4.0"}


def checkpoint_kind(model, has_head: bool) -> str:
    if type(model).__name__ == "ConvNextV2ForMaskedImageModeling":
        return "FCMAE pre-trained encoder and decoder (pre-training can continue)"
    if not has_head:
        return "encoder of an FCMAE checkpoint with a new classification head, to fine-tune"
    classes = model.config.num_labels
    data = {1000: "ImageNet-1k", 21841: "ImageNet-22k"}.get(classes)
    return f"classifier of {classes} classes" + (f" (fine-tuned on {data}, going by the class count)" if data else "")


def conversion_card(model, checkpoint, source: str, has_head: bool, license: str | None, model_name: str,
                    origin: dict | None = None):
    """The card of a converted folder: where the weights came from, what they are, their licence (`origin`: what
    an export of ours recorded of its source folder)."""
    from .outputs.cards import CardInfo, inherited

    from_folder = source == "transformers" and os.path.isdir(checkpoint)  # a file is not a hub id to inherit from
    recorded = inherited(str(checkpoint)) if from_folder else dict(origin or {})
    license = check_license(license) or recorded.get("license") or (
        "unknown" if origin is not None else WEIGHT_LICENSES.get(source, "unknown"))
    kind = checkpoint_kind(model, has_head)
    where = (f"an export by `convnextv2-hf export` in the layout of {SOURCES[source]}" if origin is not None
             else f"{SOURCES[source]}. The weights were not trained by convnextv2-hf")
    return CardInfo(
        model_name=model_name,
        summary=f"ConvNeXt V2 {kind}, converted with `convnextv2-hf convert --from {source}` from "
                f"`{Path(checkpoint).name}` of {where}.",
        data="As the source's authors trained it (see the source); not retrained here.", made_by="Converted",
        recipe={"source": SOURCES[source], "source file": Path(checkpoint).name, "kind": kind,
                "licence": license + ("" if license != "unknown" else " (not recorded: pass --license)")},
        license=license, base_model=recorded.get("base_model"), tags=["converted"],
    )


def save_converted(model, config: ConvNextV2Config, output_dir: str | os.PathLike, card=None) -> None:
    """Model, processor (at the config's image size) and card written into `output_dir` through a staging folder;
    other files there are left alone, and a file of the same name that this project did not write is refused."""
    from .image_processing_convnextv2 import ConvNextV2ImageProcessor
    from .outputs.staging import PRETRAINING_MARKER, save_folder_atomically, save_model_and_processor
    from .outputs.cards import save_model_card

    processor = ConvNextV2ImageProcessor(size={"shortest_edge": config.image_size}, mask_cell_size=config.mask_cell_size,
                                         mask_ratio=config.mask_ratio)

    def write(folder: Path) -> None:
        save_model_and_processor(model, processor, folder)
        if card is not None:
            save_model_card(model, card, str(folder))

    Path(output_dir).mkdir(parents=True, exist_ok=True)
    save_folder_atomically(output_dir, write, "the converted model", PRETRAINING_MARKER)


def export_checkpoint(model, layout: str, output: str | os.PathLike, timm_conv_mlp: bool | None = None,
                      card: dict | None = None) -> StateDict:
    """Write `model` in a foreign layout: `reference` (torch.save `{'model': ...}`) or `timm` (safetensors; MLP
    weights as 1x1 convolutions where timm builds them so: `timm_conv_mlp`, by default for atto to nano widths).
    With `card` (the source folder's card data, as `convnextv2-hf export` passes it), the class names and the
    card's licence and base model are recorded beside the weights, so that converting the file back restores them."""
    from .modeling_convnextv2 import ConvNextV2ForMaskedImageModeling

    if layout == "reference" and isinstance(model, ConvNextV2ForMaskedImageModeling):
        layout = "reference_fcmae"
    if layout == "timm" and isinstance(model, ConvNextV2ForMaskedImageModeling):
        state = {k: v for k, v in model.state_dict().items() if not k.startswith("decoder.")}
    else:
        state = model.state_dict()
    if layout == "timm" and (timm_uses_conv_mlp(model.config) if timm_conv_mlp is None else timm_conv_mlp):
        layout = "timm_conv_mlp"
    foreign = from_our_layout(state, layout)
    output = Path(output)
    from .outputs.staging import claim_staging
    from .outputs.manifest import refuse_unless_ours, remove_ours, replace_ours

    refuse_unless_ours(output, "overwrite")
    staged = claim_staging(output.parent, output.name, folder=False)
    try:
        if layout.startswith("timm"):
            from safetensors.torch import save_file

            save_file({k: v.contiguous() for k, v in foreign.items()}, str(staged),
                      metadata=None if card is None else {ORIGIN_KEY: origin_record(model, card)})
        else:  # with the training settings a reference checkpoint records, so converting back keeps them
            record = {} if card is None else {ORIGIN_KEY: origin_record(model, card)}
            torch.save({"model": foreign, "args": reference_args(model.config), **record}, str(staged))
        replace_ours(staged, output)  # a rename: a reader of the old file (memory-mapped) keeps its copy
    finally:
        if staged.exists():
            remove_ours(staged)
    return foreign


def reference_args(config: ConvNextV2Config) -> dict:
    """The settings [`recorded_settings`] reads back, under the reference scripts' names (a plain dict, so that
    `torch.load(weights_only=True)` still reads the file); `layer_norm_eps` is ours (the reference fixes 1e-6)."""
    return {"input_size": config.image_size, "norm_pix_loss": config.norm_pix_loss, "mask_ratio": config.mask_ratio,
            "layer_norm_eps": config.layer_norm_eps}


def read_id2label(path: str | None) -> dict[int, str] | None:
    if path is None:
        return None
    with open(path) as handle:
        mapping = json.load(handle)
    if isinstance(mapping, list):
        return dict(enumerate(mapping))
    return {int(k): v for k, v in mapping.items()}
