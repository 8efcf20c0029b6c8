"""ConvNeXt V2 configuration with the FCMAE (masked pre-training) fields."""

from __future__ import annotations

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


class ConvNextV2Config(_HFConvNextV2Config):
    r"""
    Configuration of ConvNeXt V2 models, including FCMAE masked image modeling.

    It extends `transformers.ConvNextV2Config` (same `model_type`, same field names), so a checkpoint saved from
    this package loads in plain `transformers` and the other way round. The extra fields only matter for
    [`ConvNextV2ForMaskedImageModeling`].

    Args:
        mask_ratio (`float`, defaults to 0.6):
            Fraction of mask cells hidden from the encoder. A mask cell is `mask_cell_size x mask_cell_size` pixels.
        decoder_hidden_size (`int`, defaults to 512):
            Width of the FCMAE decoder.
        decoder_depth (`int`, defaults to 1):
            Number of ConvNeXt V2 blocks in the decoder.
        norm_pix_loss (`bool`, defaults to `False`):
            Normalise every target patch by its own mean and (unbiased) variance before the loss.
        sparse_grn_scope (`str`, defaults to `"batch"`):
            Over which visible sites the sparse encoder's GRN takes its L2 norm. `"batch"` is the reference
            implementation's behaviour (one norm over the visible sites of the whole batch, so samples influence
            each other and the result depends on how a batch is split across devices); `"sample"` takes it per
            image, as the dense GRN used for fine-tuning does.
        sparse_backend (`str`, defaults to `"gather"`):
            How the sparse encoder is executed; see `convnextv2_hf.sparse_backends.SPARSE_BACKENDS`. All
            backends compute the same numbers.
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

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        self.depths = list(self.depths)
        self.hidden_sizes = list(self.hidden_sizes)
        if len(self.depths) != self.num_stages or len(self.hidden_sizes) != self.num_stages:
            raise ValueError(
                f"`depths` ({self.depths}) and `hidden_sizes` ({self.hidden_sizes}) must both have "
                f"`num_stages`={self.num_stages} entries."
            )
        if not 0.0 < float(self.mask_ratio) < 1.0:
            raise ValueError(f"`mask_ratio` must be strictly between 0 and 1, got {self.mask_ratio}.")
        if self.sparse_grn_scope not in SPARSE_GRN_SCOPES:
            raise ValueError(f"`sparse_grn_scope` must be one of {SPARSE_GRN_SCOPES}, got {self.sparse_grn_scope!r}.")
        if self.mask_strategy not in MASK_STRATEGIES:
            raise ValueError(f"`mask_strategy` must be one of {MASK_STRATEGIES}, got {self.mask_strategy!r}.")
        if self.decoder_depth < 0 or self.decoder_hidden_size <= 0:
            raise ValueError("`decoder_depth` must be >= 0 and `decoder_hidden_size` > 0.")

    @property
    def stem_stride(self) -> int:
        patch = self.patch_size
        if isinstance(patch, (list, tuple)):
            if len(set(patch)) != 1:
                raise ValueError(f"Only square stems are supported, got patch_size={patch}.")
            patch = patch[0]
        return int(patch)

    @property
    def mask_cell_size(self) -> int:
        """Side of one mask cell in pixels: the network's total stride (stem stride x 2 per later stage)."""
        return self.stem_stride * 2 ** (self.num_stages - 1)

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
