"""ConvNeXt V2 configuration with the FCMAE (masked pre-training) fields.

Model side: shipped inside FCMAE checkpoints, so it imports only transformers.
"""

from __future__ import annotations

from numbers import Real

from transformers.models.convnextv2.configuration_convnextv2 import ConvNextV2Config as _HFConvNextV2Config

# name -> (depths, hidden_sizes), from the ConvNeXt V2 paper (SPEC section 1).
CONVNEXTV2_PRESETS: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {
    "atto": ((2, 2, 6, 2), (40, 80, 160, 320)),
    "femto": ((2, 2, 6, 2), (48, 96, 192, 384)),
    "pico": ((2, 2, 6, 2), (64, 128, 256, 512)),
    "nano": ((2, 2, 8, 2), (80, 160, 320, 640)),
    "tiny": ((3, 3, 9, 3), (96, 192, 384, 768)),
    "base": ((3, 3, 27, 3), (128, 256, 512, 1024)),
    "large": ((3, 3, 27, 3), (192, 384, 768, 1536)),
    "huge": ((3, 3, 27, 3), (352, 704, 1408, 2816)),
}

SPARSE_GRN_SCOPES = ("batch", "sample")
MASK_STRATEGIES = ("fcmae", "mixmae")
SPARSE_BACKEND_NAMES = ("dense", "gather", "minkowski")


def _one_of(choices: tuple[str, ...]):
    def check(name: str, value) -> None:
        if value not in choices:
            raise ValueError(f"`{name}` must be one of {choices}, got {value!r}.")
    return check


def _number(low: float, high: float | None = None, low_open: bool = False, integer: bool = False):
    def check(name: str, value) -> None:
        kind = int if integer else Real
        valid = isinstance(value, kind) and not isinstance(value, bool)
        if valid:
            valid = (value > low if low_open else value >= low) and (high is None or value < high)
        if not valid:
            bounds = f"{'>' if low_open else '>='} {low}" + (f" and < {high}" if high is not None else "")
            raise ValueError(f"`{name}` must be {'an integer' if integer else 'a number'} {bounds}, got {value!r}.")
    return check


def _boolean(name: str, value) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"`{name}` must be true or false, got {value!r}.")


def _positive_integers(name: str, value) -> None:
    if value is None:
        return  # transformers fills the default in later
    values = list(value) if isinstance(value, (list, tuple)) else None
    if not values or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in values):
        raise ValueError(f"`{name}` must be a list of positive integers, got {value!r}.")


FCMAE_ARCHITECTURE = "ConvNextV2ForMaskedImageModeling"

# Checked whenever the field is set: at construction, by `from_pretrained(..., field=value)` and by assignment.
FIELD_CHECKS = {
    "mask_ratio": _number(0.0, 1.0, low_open=True),
    "decoder_hidden_size": _number(1, integer=True),
    "decoder_depth": _number(0, integer=True),
    "num_stages": _number(1, integer=True),
    "drop_path_rate": _number(0.0, 1.0),
    "sparse_grn_scope": _one_of(SPARSE_GRN_SCOPES),
    "mask_strategy": _one_of(MASK_STRATEGIES),
    "sparse_backend": _one_of(SPARSE_BACKEND_NAMES),
    "use_grn": _boolean,
    "norm_pix_loss": _boolean,
    "depths": _positive_integers,
    "hidden_sizes": _positive_integers,
    "image_size": _number(1, integer=True),
    "num_channels": _number(1, integer=True),
    "layer_norm_eps": _number(0.0, low_open=True),
}


class ConvNextV2Config(_HFConvNextV2Config):
    r"""
    Configuration of ConvNeXt V2 models, including FCMAE masked image modeling.

    It extends `transformers.ConvNextV2Config` (same `model_type`, same field names, e.g.
    [facebook/convnextv2-tiny-1k-224](https://huggingface.co/facebook/convnextv2-tiny-1k-224)), so a checkpoint
    saved from this package loads in plain `transformers` and the other way round. The extra fields only matter for
    [`ConvNextV2ForMaskedImageModeling`]. Every field is range-checked when set.

    Args:
        mask_ratio (`float`, defaults to 0.6):
            Fraction of mask cells hidden from the encoder, strictly between 0 and 1. A mask cell is
            `mask_cell_size x mask_cell_size` pixels.
        decoder_hidden_size (`int`, defaults to 512):
            Width of the FCMAE decoder.
        decoder_depth (`int`, defaults to 1):
            Number of ConvNeXt V2 blocks in the decoder.
        norm_pix_loss (`bool`, defaults to `False`):
            Normalise every target patch by its own mean and (unbiased) variance before the loss. The pre-training
            script turns it on, as the reference recipe does.
        sparse_grn_scope (`str`, defaults to `"batch"`):
            Over which visible sites the sparse encoder's GRN takes its L2 norm. `"batch"` is the reference
            implementation's behaviour (one norm over the visible sites of the whole batch, so samples influence
            each other and the result depends on how a batch is split across devices); `"sample"` takes it per
            image, as the dense GRN used for fine-tuning does.
        sparse_backend (`str`, defaults to `"gather"`):
            How the sparse encoder is executed: `"gather"`, `"dense"` or `"minkowski"` (see
            `convnextv2_hf.sparse_backends`). All backends compute the same numbers.
        mask_strategy (`str`, defaults to `"fcmae"`):
            `"fcmae"` hides the masked cells; `"mixmae"` fills them with the batch-flipped partner image (MixMAE) and
            reconstructs both sources, each from its own visible cells (see SPEC section 4).
        use_grn (`bool`, defaults to `True`):
            Global Response Normalization in every block. `False` gives a ConvNeXt V1 style block (for ablations).

    Example:

    ```python
    >>> from convnextv2_hf import ConvNextV2Config
    >>> config = ConvNextV2Config.from_preset("atto", num_labels=10)
    >>> config.hidden_sizes, config.mask_cell_size
    ([40, 80, 160, 320], 32)
    ```
    """

    model_type = "convnextv2"

    mask_ratio: float = 0.6
    decoder_hidden_size: int = 512
    decoder_depth: int = 1
    norm_pix_loss: bool = False
    sparse_grn_scope: str = "batch"
    sparse_backend: str = "gather"
    mask_strategy: str = "fcmae"
    use_grn: bool = True

    def __setattr__(self, name, value):
        if name in FIELD_CHECKS:
            FIELD_CHECKS[name](name, value)
        super().__setattr__(name, value)

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        self.depths = list(self.depths)
        self.hidden_sizes = list(self.hidden_sizes)
        self.check_architecture()

    def to_dict(self) -> dict:
        """As transformers saves it, with two differences wherever this class is used (also as remote code):

        - an FCMAE config also records `encoder_stride` (derived, read back only for agreement), which tools such as
          transformers' `run_mim.py` read before loading the model, so that they reach the load and learn there
          that the folder needs `trust_remote_code`;
        - any other model's config drops `auto_map`: a classifier fine-tuned from an FCMAE folder through
          `trust_remote_code` is a plain transformers checkpoint, and must not point at code it does not hold.
        """
        output = super().to_dict()
        if FCMAE_ARCHITECTURE in (self.architectures or []):
            output["encoder_stride"] = self.encoder_stride
        else:
            output.pop("auto_map", None)
        return output

    def check_architecture(self) -> None:
        """Raise a `ValueError` if depths, widths and stages do not describe a buildable network."""
        if len(self.depths) != self.num_stages or len(self.hidden_sizes) != self.num_stages:
            raise ValueError(
                f"`depths` ({list(self.depths)}) and `hidden_sizes` ({list(self.hidden_sizes)}) must both have "
                f"`num_stages`={self.num_stages} entries."
            )
        for name in ("depths", "hidden_sizes"):
            values = list(getattr(self, name))
            if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in values):
                raise ValueError(f"Every entry of `{name}` must be a positive integer, got {values}.")
        self.stem_stride  # noqa: B018 (validates patch_size)

    @property
    def stem_stride(self) -> int:
        patch = self.patch_size
        if isinstance(patch, (list, tuple)):
            if len(set(patch)) != 1:
                raise ValueError(f"Only square stems are supported, got patch_size={patch}.")
            patch = patch[0]
        if isinstance(patch, bool) or not isinstance(patch, int) or patch < 1:
            raise ValueError(f"`patch_size` must be a positive integer, got {patch!r}.")
        return int(patch)

    @property
    def mask_cell_size(self) -> int:
        """Side of one mask cell in pixels: the network's total stride (stem stride x 2 per later stage)."""
        return self.stem_stride * 2 ** (self.num_stages - 1)

    @property
    def encoder_stride(self) -> int:
        """The network's total stride, under the name transformers' masked-image-modeling example reads."""
        return self.mask_cell_size

    @encoder_stride.setter
    def encoder_stride(self, value: int) -> None:
        # run_mim.py writes the stride back; it is derived from patch_size and num_stages, so only agreement is allowed
        if value is not None and value != self.mask_cell_size:
            raise ValueError(
                f"encoder_stride={value} does not match this network's total stride ({self.mask_cell_size} px = "
                "patch_size x 2 ** (num_stages - 1)); change patch_size or num_stages instead."
            )

    @classmethod
    def from_preset(cls, name: str, **kwargs) -> "ConvNextV2Config":
        """Build the config of one of the eight named sizes (`atto` ... `huge`); `kwargs` override fields."""
        if name not in CONVNEXTV2_PRESETS:
            raise ValueError(f"Unknown preset {name!r}; choose one of {sorted(CONVNEXTV2_PRESETS)}.")
        depths, hidden_sizes = CONVNEXTV2_PRESETS[name]
        kwargs.setdefault("depths", list(depths))
        kwargs.setdefault("hidden_sizes", list(hidden_sizes))
        return cls(**kwargs)


__all__ = ["ConvNextV2Config", "CONVNEXTV2_PRESETS"]
