"""Loading weights with checks transformers leaves to a log line: damaged tensors refused, weights the model
needs but the checkpoint lacks named."""

from __future__ import annotations

import logging
import os
from contextlib import contextmanager
from pathlib import Path

from safetensors import SafetensorError, safe_open

from .configuration_convnextv2 import ConvNextV2Config

logger = logging.getLogger(__name__)


def check_weight_files(folder: str | os.PathLike, flag: str, counters_allowed: bool = False) -> None:
    """Every `*.safetensors` file in `folder` must be readable and hold finite floating-point weights: a truncated
    copy, integer or NaN weights would otherwise load (cast or as they are) and train on silently. With
    `counters_allowed`, integer tensors (a checkpoint's step counters, e.g. the EMA's `n_averaged`) pass."""
    for file in sorted(Path(folder).glob("*.safetensors")):
        try:
            with safe_open(str(file), framework="pt") as handle:
                for key in handle.keys():
                    check_weight(handle.get_tensor(key), key, file, flag, counters_allowed)
        except SafetensorError as error:
            raise ValueError(f"{flag} {folder}: {file.name} cannot be read ({error}); it is truncated or damaged, so "
                             "copy it again or start from another checkpoint.") from None


def check_weight(tensor, key: str, file: Path, flag: str, counters_allowed: bool) -> None:
    if not tensor.is_floating_point() and counters_allowed:
        return
    if not tensor.is_floating_point():
        raise ValueError(f"{flag} {file.parent}: weight {key} in {file.name} is {tensor.dtype}, not floating point; "
                         "the file is damaged or not a model: start from another checkpoint.")
    if not bool(tensor.isfinite().all()):
        raise ValueError(f"{flag} {file.parent}: weight {key} in {file.name} holds NaN or infinite values; start "
                         "from another checkpoint (or resume from an earlier one).")



def load_checked(model_class, source: str, config, cache_dir=None, new_parts: tuple[str, ...] = (), **kwargs):
    """`model_class.from_pretrained(source)`, refusing damaged weights and naming weights the checkpoint lacks
    (other than the `new_parts` this start adds, e.g. a new classifier); transformers would initialise them
    randomly and only log it."""
    model_type = ConvNextV2Config.get_config_dict(source, cache_dir=cache_dir)[0].get("model_type")
    if model_type != ConvNextV2Config.model_type:
        raise ValueError(f"--model_name_or_path {source} holds a {model_type!r} model, not ConvNeXt V2 "
                         f"({ConvNextV2Config.model_type!r}); start from a ConvNeXt V2 checkpoint (or convert it first).")
    if os.path.isdir(source):
        check_weight_files(source, "--model_name_or_path")
    with transformers_load_report_off():  # said below in our words: which new weights are expected, which are not
        model, info = model_class.from_pretrained(source, config=config, cache_dir=cache_dir, output_loading_info=True,
                                                  **kwargs)
    new = sorted({key.rsplit(".", 1)[0] for key in info["missing_keys"] if key.startswith(new_parts)})
    if new:
        logger.info("%s: new %s, initialised for this run (expected for this start).", source, ", ".join(new))
    if info["unexpected_keys"]:
        logger.warning("%s: %d weight(s) not used by %s: %s", source, len(info["unexpected_keys"]), model_class.__name__,
                       ", ".join(sorted(info["unexpected_keys"])[:5]))
    missing = sorted(key for key in info["missing_keys"] if not key.startswith(new_parts))
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise ValueError(f"--model_name_or_path {source} lacks {len(missing)} weight(s) the model needs ({shown}); "
                         "it is incomplete or another architecture: start from a complete ConvNeXt V2 checkpoint.")
    return model


@contextmanager
def transformers_load_report_off():
    """transformers' LOAD REPORT table off while [`load_checked`] loads (it reports the same in one line each)."""
    from transformers.utils import logging as hf_logging

    report = hf_logging.get_logger("transformers.modeling_utils")
    level = report.level
    report.setLevel(logging.ERROR)
    try:
        yield
    finally:
        report.setLevel(level)
