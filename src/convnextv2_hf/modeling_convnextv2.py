"""PyTorch ConvNeXt V2 models: backbone, image classifier, feature-pyramid backbone and FCMAE masked image modeling.

Parameter names and shapes follow `transformers`' ConvNeXt V2 exactly, so checkpoints cross over both ways.

Model side: this file and the files it imports are copied into FCMAE checkpoints (`trust_remote_code`), so they
import only torch, transformers and each other.
"""

from __future__ import annotations

import difflib
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.backbone_utils import BackboneMixin
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import (
    BackboneOutput,
    BaseModelOutputWithPoolingAndNoAttention,
    ImageClassifierOutputWithNoAttention,
)
from transformers.processing_utils import Unpack
from transformers.utils import ModelOutput, TransformersKwargs, can_return_tuple

from .configuration_convnextv2 import ConvNextV2Config
from .masking import normalize_patches, num_visible_cells, patchify, random_masking, unpatchify, upsample_mask
from .sparse_backends import get_sparse_backend
from .sparse_ops import apply_grn, channel_norm, relative_response

# --------------------------------------------------------------------------------------------- layers


class ConvNextV2LayerNorm(nn.LayerNorm):
    """LayerNorm over channels, for `channels_last` (N, H, W, C) or `channels_first` (N, C, H, W) inputs."""

    def __init__(self, normalized_shape: int, eps: float = 1e-6, data_format: str = "channels_last"):
        super().__init__(normalized_shape, eps=eps)
        if data_format not in ("channels_last", "channels_first"):
            raise ValueError(f"Unsupported data format: {data_format}")
        self.data_format = data_format

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.data_format == "channels_first":
            return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return super().forward(x)


class ConvNextV2GRN(nn.Module):
    """Global Response Normalization on channels-last features (N, H, W, C); per-sample L2 norm over space."""

    def __init__(self, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1, 1, 1, dim))
        self.bias = nn.Parameter(torch.zeros(1, 1, 1, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return apply_grn(x, self.weight, self.bias, relative_response(channel_norm(x, (1, 2))))


class ConvNextV2DropPath(nn.Module):
    """Stochastic depth: drop a whole residual branch per sample during training."""

    def __init__(self, drop_prob: float = 0.0):
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep_prob = 1.0 - self.drop_prob
        shape = (x.shape[0],) + (1,) * (x.ndim - 1)
        keep = torch.empty(shape, dtype=x.dtype, device=x.device).bernoulli_(keep_prob)
        return x * keep / keep_prob

    def extra_repr(self) -> str:
        return f"p={self.drop_prob}"


class ConvNextV2Embeddings(nn.Module):
    """Stem: non-overlapping `patch_size` convolution, then LayerNorm over channels."""

    def __init__(self, config: ConvNextV2Config):
        super().__init__()
        self.patch_embeddings = nn.Conv2d(
            config.num_channels, config.hidden_sizes[0], kernel_size=config.patch_size, stride=config.patch_size
        )
        self.layernorm = ConvNextV2LayerNorm(config.hidden_sizes[0], eps=1e-6, data_format="channels_first")
        self.num_channels = config.num_channels

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.layernorm(self.patch_embeddings(pixel_values))


class ConvNextV2Layer(GradientCheckpointingLayer):
    """ConvNeXt V2 block: dwconv 7x7 -> LN -> Linear(4C) -> GELU -> GRN -> Linear(C), plus residual."""

    def __init__(self, config: ConvNextV2Config, dim: int, drop_path: float = 0.0):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, kernel_size=7, padding=3, groups=dim)
        self.layernorm = ConvNextV2LayerNorm(dim, eps=1e-6)
        self.pwconv1 = nn.Linear(dim, 4 * dim)
        self.act = ACT2FN[config.hidden_act]
        self.grn = ConvNextV2GRN(4 * dim) if getattr(config, "use_grn", True) else nn.Identity()
        self.pwconv2 = nn.Linear(4 * dim, dim)
        self.drop_path = ConvNextV2DropPath(drop_path) if drop_path > 0.0 else nn.Identity()

    def forward(self, x: torch.Tensor, sparse=None) -> torch.Tensor:
        """`x` (N, C, H, W); inside the FCMAE sparse encoder, `sparse` runs the block on that backend's sites."""
        if sparse is not None:
            return sparse.run(self, x)
        y = self.layernorm(self.dwconv(x).permute(0, 2, 3, 1))
        y = self.pwconv2(self.grn(self.act(self.pwconv1(y)))).permute(0, 3, 1, 2)
        return x + self.drop_path(y)


class ConvNextV2Stage(nn.Module):
    """Downsampling (LN + 2x2 stride-2 conv, every stage but the first) followed by `depth` blocks."""

    def __init__(self, config, in_channels: int, out_channels: int, downsample: bool, drop_path_rates: list[float]):
        super().__init__()
        self.downsampling_layer = nn.ModuleList()
        if downsample:
            self.downsampling_layer.extend([
                ConvNextV2LayerNorm(in_channels, eps=1e-6, data_format="channels_first"),
                nn.Conv2d(in_channels, out_channels, kernel_size=2, stride=2),
            ])
        self.layers = nn.ModuleList(ConvNextV2Layer(config, out_channels, rate) for rate in drop_path_rates)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.downsampling_layer:
            x = layer(x)
        for layer in self.layers:
            x = layer(x)
        return x


class ConvNextV2Encoder(nn.Module):
    """The stages; like transformers', every stage after the first halves the resolution (also at equal widths)."""

    def __init__(self, config: ConvNextV2Config):
        super().__init__()
        rates = torch.linspace(0, config.drop_path_rate, sum(config.depths), device="cpu").split(config.depths)
        widths = [config.hidden_sizes[0]] + list(config.hidden_sizes)
        self.stages = nn.ModuleList(
            ConvNextV2Stage(config, widths[i], widths[i + 1], i > 0, rates[i].tolist()) for i in range(config.num_stages)
        )

    def forward(self, x: torch.Tensor, output_hidden_states: bool = False):
        hidden_states = (x,) if output_hidden_states else None
        for stage in self.stages:
            x = stage(x)
            if output_hidden_states:
                hidden_states = hidden_states + (x,)
        return x, hidden_states


# --------------------------------------------------------------------------------------------- input checks


ACCEPTED_KWARGS = frozenset(TransformersKwargs.__annotations__)
PROCESSOR_HINT = "ConvNextV2ImageProcessor (or AutoImageProcessor) with return_tensors='pt'"


def check_kwargs(model: nn.Module, kwargs: dict, parameters: tuple[str, ...]) -> None:
    """Unknown keyword arguments are errors, with the nearest known name as a hint."""
    unknown = sorted(set(kwargs) - ACCEPTED_KWARGS)
    if unknown:
        close = difflib.get_close_matches(unknown[0], parameters + tuple(ACCEPTED_KWARGS), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else "."
        raise TypeError(f"{type(model).__name__}.forward() got an unexpected keyword argument {unknown[0]!r}{hint}")


def check_labels(labels, logits: torch.Tensor, config: ConvNextV2Config) -> None:
    """Class indices (or -100, ignored) for single-label problems; `(batch, num_labels)` scores for multi-label ones.
    transformers would read a 1-D bool or float tensor as multi-label targets and fail on the shape later."""
    if not isinstance(labels, torch.Tensor):
        raise ValueError(f"`labels` must be a torch.Tensor of class indices, got {type(labels).__name__}.")
    if config.problem_type == "regression" or (config.num_labels == 1 and labels.is_floating_point()):
        return
    if labels.shape == logits.shape and (labels.is_floating_point() or labels.dtype == torch.bool):
        return  # multi-label targets
    if labels.is_floating_point() or labels.dtype == torch.bool or labels.dim() != 1:
        raise ValueError(
            f"`labels` must be integer class indices of shape (batch,), or multi-label float targets of shape "
            f"{tuple(logits.shape)}; got {labels.dtype} of shape {tuple(labels.shape)}."
        )
    valid = (labels == -100) | ((labels >= 0) & (labels < config.num_labels))
    if not bool(valid.all()):
        raise ValueError(f"`labels` must lie in 0..{config.num_labels - 1} (the model's classes) or be -100 (ignored), "
                         f"got {labels[~valid][0].item()}.")


def check_pixel_values(pixel_values, config: ConvNextV2Config, dtype: torch.dtype, multiple: bool = False) -> None:
    """Raise a `ValueError` naming the problem if `pixel_values` is not a valid `(N, C, H, W)` batch for the model."""
    if pixel_values is None:
        raise ValueError(f"You have to specify pixel_values (from {PROCESSOR_HINT}).")
    if not isinstance(pixel_values, torch.Tensor):
        raise ValueError(f"`pixel_values` must be a torch.Tensor (from {PROCESSOR_HINT}), got {type(pixel_values).__name__}.")
    if pixel_values.dim() != 4:
        raise ValueError(f"`pixel_values` must have shape (batch, channels, height, width), got {tuple(pixel_values.shape)}.")
    if pixel_values.shape[0] == 0:
        raise ValueError(f"`pixel_values` holds no images (batch size 0, shape {tuple(pixel_values.shape)}).")
    if pixel_values.shape[1] != config.num_channels:
        raise ValueError(
            f"`pixel_values` has {pixel_values.shape[1]} channels but the model expects {config.num_channels} "
            f"(config.num_channels); shape {tuple(pixel_values.shape)}."
        )
    if pixel_values.dtype != dtype and not torch.is_autocast_enabled(pixel_values.device.type):
        kind = "integer pixels" if not pixel_values.is_floating_point() else str(pixel_values.dtype)
        raise ValueError(
            f"`pixel_values` has dtype {pixel_values.dtype} ({kind}) but the model's weights are {dtype}: pass "
            f"normalised {dtype} images from {PROCESSOR_HINT} (then `.to(model.dtype)`), or run under torch.autocast."
        )
    height, width = pixel_values.shape[-2:]
    cell = config.mask_cell_size
    if height < cell or width < cell:
        raise ValueError(
            f"`pixel_values` are {height}x{width} px, smaller than the network's total stride ({cell} px); resize "
            f"them to at least {cell}x{cell} ({PROCESSOR_HINT} does, to config.image_size={config.image_size})."
        )
    if multiple and (height % cell or width % cell):
        raise ValueError(
            f"Image height and width must be multiples of the mask cell ({cell} px, the network's total "
            f"stride), got {height}x{width}. Resize or crop, e.g. to {max(cell, height // cell * cell)}x"
            f"{max(cell, width // cell * cell)}."
        )


def capture_requested(output_hidden_states) -> bool:
    """`output_hidden_states` is a flag, or (transformers 5) an index or a list of indices to keep."""
    if output_hidden_states is None or isinstance(output_hidden_states, bool):
        return bool(output_hidden_states)
    return True


def select_hidden_states(hidden_states, output_hidden_states):
    """Keep the requested hidden states and put `None` elsewhere, as transformers 5 does for a list of indices."""
    if hidden_states is None or isinstance(output_hidden_states, bool):
        return hidden_states
    wanted = [output_hidden_states] if isinstance(output_hidden_states, int) else list(output_hidden_states)
    count = len(hidden_states)
    keep = {i % count for i in wanted if -count <= i < count}
    return tuple(h if i in keep else None for i, h in enumerate(hidden_states))


def encode_densely(model, pixel_values, output_hidden_states, kwargs: dict, capture_all: bool = False):
    """The dense models' shared start: check the inputs, run stem and stages. Returns the last map, the hidden
    states (all of them when captured) and the resolved `output_hidden_states`."""
    check_kwargs(model, kwargs, ("pixel_values", "output_hidden_states", "return_dict"))
    check_pixel_values(pixel_values, model.config, model.embeddings.patch_embeddings.weight.dtype)
    if output_hidden_states is None:
        output_hidden_states = model.config.output_hidden_states
    # Channels-last memory makes every per-block permute a free view and suits the depthwise convolution.
    embedded = model.embeddings(pixel_values).contiguous(memory_format=torch.channels_last)
    last, hidden_states = model.encoder(embedded, capture_all or capture_requested(output_hidden_states))
    return last, hidden_states, output_hidden_states


# --------------------------------------------------------------------------------------------- models


@contextmanager
def code_in_config(config: ConvNextV2Config, ships_code: bool):
    """While saving: an FCMAE model's config names its own code (`auto_map`, for `trust_remote_code`); every other
    folder is a plain transformers checkpoint, without an `auto_map` (also one inherited from an FCMAE start)."""
    saved = config.__dict__.pop("auto_map", None)
    if ships_code:
        config.auto_map = {}
        config._auto_class = "AutoConfig"
    try:
        yield
    finally:
        config.__dict__.pop("auto_map", None)
        config.__dict__.pop("_auto_class", None)
        if saved is not None:
            config.auto_map = saved


class ConvNextV2PreTrainedModel(PreTrainedModel):
    config_class = ConvNextV2Config
    config: ConvNextV2Config
    base_model_prefix = "convnextv2"
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    supports_gradient_checkpointing = True
    accepts_loss_kwargs = False
    _no_split_modules = ["ConvNextV2Layer"]
    # An FCMAE checkpoint's decoder, left behind on purpose when its encoder is loaded into an encoder-only class.
    _keys_to_ignore_on_load_unexpected = [r"(^|\.)decoder\."]
    # Hidden states are the stem output and each stage's output; `output_hidden_states=[i, ...]` selects among them.
    _can_record_outputs = {"hidden_states": ConvNextV2Stage}

    def __init__(self, config: ConvNextV2Config, *args, **kwargs):
        if hasattr(config, "check_architecture"):
            config.check_architecture()
        super().__init__(config, *args, **kwargs)

    @torch.no_grad()
    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, ConvNextV2GRN):
            init.zeros_(module.weight)
            init.zeros_(module.bias)
        elif isinstance(module, FCMAEDecoder):
            init.normal_(module.mask_token, std=0.02)

    def get_input_embeddings(self) -> nn.Module:
        """The stem's patchify convolution, which transformers' tools (input gradients for adapters) and Accelerate's
        FSDP2 (its own shard unit) take as the input embedding."""
        return getattr(self, self.base_model_prefix, self).embeddings.patch_embeddings

    def save_pretrained(self, save_directory, *args, **kwargs):
        """Save as transformers does; only classes transformers lacks (the FCMAE model) write their code beside it."""
        with code_in_config(self.config, ships_code=self._auto_class is not None):
            return super().save_pretrained(save_directory, *args, **kwargs)


class ConvNextV2Model(ConvNextV2PreTrainedModel):
    """ConvNeXt V2 backbone: stem, stages and (with `add_pooling_layer`) global pooling + LayerNorm."""

    def __init__(self, config: ConvNextV2Config, add_pooling_layer: bool = True):
        super().__init__(config)
        self.embeddings = ConvNextV2Embeddings(config)
        self.encoder = ConvNextV2Encoder(config)
        self.layernorm = nn.LayerNorm(config.hidden_sizes[-1], eps=config.layer_norm_eps) if add_pooling_layer else None
        self.post_init()

    @can_return_tuple
    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        output_hidden_states: bool | int | list[int] | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> BaseModelOutputWithPoolingAndNoAttention:
        r"""
        Args:
            pixel_values (`torch.FloatTensor` of shape `(batch_size, num_channels, height, width)`):
                Normalised images, e.g. from [`ConvNextV2ImageProcessor`].
            output_hidden_states (`bool`, `int` or `list[int]`, *optional*):
                Also return the stem output and every stage's output (`True`), or only those at the given indices
                (`None` elsewhere).
            return_dict (`bool`, *optional*):
                Return a [`~transformers.utils.ModelOutput`] (default) instead of a tuple.
        """
        last_hidden_state, hidden_states, output_hidden_states = encode_densely(self, pixel_values, output_hidden_states,
                                                                                kwargs)
        pooled = self.layernorm(last_hidden_state.mean([-2, -1])) if self.layernorm is not None else None
        return BaseModelOutputWithPoolingAndNoAttention(
            last_hidden_state=last_hidden_state, pooler_output=pooled,
            hidden_states=select_hidden_states(hidden_states, output_hidden_states),
        )


class ConvNextV2ForImageClassification(ConvNextV2PreTrainedModel):
    """ConvNeXt V2 with a linear classifier on the pooled features.

    Example:

    ```python
    >>> import torch
    >>> from convnextv2_hf import ConvNextV2Config, ConvNextV2ForImageClassification
    >>> model = ConvNextV2ForImageClassification(ConvNextV2Config.from_preset("atto", num_labels=3))
    >>> model(torch.randn(2, 3, 64, 64)).logits.shape
    torch.Size([2, 3])
    ```
    """

    def __init__(self, config: ConvNextV2Config):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.convnextv2 = ConvNextV2Model(config)
        self.classifier = (
            nn.Linear(config.hidden_sizes[-1], config.num_labels) if config.num_labels > 0 else nn.Identity()
        )
        self.post_init()

    @can_return_tuple
    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        output_hidden_states: bool | int | list[int] | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> ImageClassifierOutputWithNoAttention:
        r"""
        Args:
            pixel_values (`torch.FloatTensor` of shape `(batch_size, num_channels, height, width)`):
                Normalised images.
            labels (`torch.LongTensor` of shape `(batch_size,)`, *optional*):
                Class indices; with them the output carries the loss (cross-entropy for single-label problems).
            output_hidden_states (`bool`, `int` or `list[int]`, *optional*):
                As for [`ConvNextV2Model`].
        """
        check_kwargs(self, kwargs, ("pixel_values", "labels", "output_hidden_states", "return_dict"))
        outputs = self.convnextv2(pixel_values, output_hidden_states=output_hidden_states, return_dict=True)
        logits = self.classifier(outputs.pooler_output)
        loss = None
        if labels is not None:
            check_labels(labels, logits, self.config)
            loss = self.loss_function(labels=labels, pooled_logits=logits, config=self.config)
        return ImageClassifierOutputWithNoAttention(loss=loss, logits=logits, hidden_states=outputs.hidden_states)


class ConvNextV2Backbone(BackboneMixin, ConvNextV2PreTrainedModel):
    """Feature pyramid for dense prediction heads (UperNet, DETR, Mask2Former), with transformers' backbone API.

    Same weights and names as transformers' `ConvNextV2Backbone`: it loads the encoder of an FCMAE or classifier
    checkpoint (`out_features` / `out_indices` pick the stages; each gets its own new LayerNorm).

    Example:

    ```python
    >>> import torch
    >>> from convnextv2_hf import ConvNextV2Backbone, ConvNextV2Config
    >>> backbone = ConvNextV2Backbone(ConvNextV2Config.from_preset("atto", out_features=["stage2", "stage4"]))
    >>> [tuple(m.shape) for m in backbone(torch.randn(1, 3, 64, 64)).feature_maps]
    [(1, 80, 8, 8), (1, 320, 2, 2)]
    ```
    """

    has_attentions = False

    def __init__(self, config: ConvNextV2Config):
        super().__init__(config)
        self.embeddings = ConvNextV2Embeddings(config)
        self.encoder = ConvNextV2Encoder(config)
        self.num_features = [config.hidden_sizes[0]] + list(config.hidden_sizes)
        self.hidden_states_norms = nn.ModuleDict({
            stage: ConvNextV2LayerNorm(channels, data_format="channels_first")
            for stage, channels in zip(self.out_features, self.channels)
        })
        self.post_init()

    @can_return_tuple
    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        output_hidden_states: bool | int | list[int] | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> BackboneOutput:
        r"""
        Args:
            pixel_values (`torch.FloatTensor` of shape `(batch_size, num_channels, height, width)`):
                Normalised images.
            output_hidden_states (`bool`, `int` or `list[int]`, *optional*):
                Also return the stem output and every stage's output (before the feature-map norms).
        """
        _, hidden_states, output_hidden_states = encode_densely(self, pixel_values, output_hidden_states, kwargs,
                                                                capture_all=True)
        feature_maps = tuple(
            self.hidden_states_norms[stage](state)
            for stage, state in zip(self.stage_names, hidden_states) if stage in self.out_features
        )
        kept = select_hidden_states(hidden_states, output_hidden_states) if capture_requested(output_hidden_states) else None
        return BackboneOutput(feature_maps=feature_maps, hidden_states=kept)


# --------------------------------------------------------------------------------------------- FCMAE


@dataclass
class ConvNextV2MaskedImageModelingOutput(ModelOutput):
    r"""
    Output of [`ConvNextV2ForMaskedImageModeling`].

    Args:
        loss (`torch.FloatTensor` of shape `()`):
            Mean squared error per patch, averaged over masked patches only.
        logits (`torch.FloatTensor` of shape `(batch_size, num_cells, cell * cell * num_channels)`):
            One prediction per mask cell, pixels ordered (row-in-patch, column-in-patch, channel).
        reconstruction (`torch.FloatTensor` of shape `(batch_size, num_channels, height, width)`):
            `logits` folded back to image space (in per-patch normalised units when `norm_pix_loss` is set).
        mask (`torch.FloatTensor` of shape `(batch_size, num_cells)`):
            The mask used, 1.0 = masked, 0.0 = visible (a float tensor, as transformers' masked autoencoders return;
            `mask.bool()` gives the boolean form).
        hidden_states (`tuple(torch.FloatTensor)`, *optional*):
            Stem output and every stage's output of the sparse encoder, zero at masked positions. With
            `mask_strategy="mixmae"` each has 2N rows: the N images' own encodings, then the N partner encodings.
        partner_logits, partner_reconstruction (*optional*, `mask_strategy="mixmae"` only):
            Predictions for the partner image (`pixel_values.flip(0)`), whose pixels fill the masked cells of the
            mixed input, at the cells it did not show (`~mask`).
        mixed_pixel_values (*optional*, `mask_strategy="mixmae"` only):
            The mixed input `x * (1 - m) + x.flip(0) * m` that the two sparse encodings together see.
    """

    loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    reconstruction: torch.FloatTensor | None = None
    mask: torch.FloatTensor | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    partner_logits: torch.FloatTensor | None = None
    partner_reconstruction: torch.FloatTensor | None = None
    mixed_pixel_values: torch.FloatTensor | None = None


class FCMAEDecoder(nn.Module):
    """FCMAE decoder: 1x1 projection, mask tokens at masked cells, ConvNeXt V2 blocks, 1x1 pixel prediction."""

    def __init__(self, config: ConvNextV2Config):
        super().__init__()
        width = config.decoder_hidden_size
        self.proj = nn.Conv2d(config.hidden_sizes[-1], width, kernel_size=1)
        self.mask_token = nn.Parameter(torch.zeros(1, width, 1, 1))
        self.layers = nn.ModuleList(ConvNextV2Layer(config, width) for _ in range(config.decoder_depth))
        self.pred = nn.Conv2d(width, config.mask_cell_size**2 * config.num_channels, kernel_size=1)

    def forward(self, encoded: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """`encoded` (N, C, h, w), `mask` (N, h, w) bool -> predictions (N, cell*cell*channels, h, w)."""
        x = self.proj(encoded)
        x = torch.where(mask[:, None], self.mask_token.to(x.dtype), x)
        for layer in self.layers:
            x = layer(x)
        return self.pred(x)


def cells_from_patches(mask: torch.Tensor, grid: tuple[int, int], cell: int, image_size: tuple[int, int]) -> torch.Tensor:
    """A mask given per `p`-px patch (`p` dividing the mask cell, e.g. SimMIM's / run_mim.py's `patch_size`) ->
    the (N, h, w) cell mask; it must be constant within every cell."""
    n = mask.shape[0]
    height, width = image_size
    entries = mask[0].numel()
    patch = next((p for p in range(1, cell + 1) if cell % p == 0 and (height // p) * (width // p) == entries), None)
    if patch is None or (mask.dim() == 3 and mask.shape[1:] != (height // patch, width // patch)):
        raise ValueError(
            f"`bool_masked_pos` must have shape ({n}, {grid[0] * grid[1]}) or ({n}, {grid[0]}, {grid[1]}) for images "
            f"of {tuple(image_size)} px (mask cell {cell} px), or be given per patch of a size dividing {cell} px; "
            f"got {tuple(mask.shape)}."
        )
    per = cell // patch
    blocks = mask.reshape(n, grid[0], per, grid[1], per)
    if patch < cell and not torch.compiler.is_exporting() and (blocks.amax((2, 4)) != blocks.amin((2, 4))).any():
        raise ValueError(
            f"`bool_masked_pos` is given per {patch}-px patch but is not constant within each {cell}-px mask cell; "
            f"FCMAE masks whole cells. Draw it per cell (e.g. SimMIM's MaskGenerator with mask_patch_size={cell} "
            f"and model_patch_size={patch})."
        )
    return blocks[:, :, 0, :, 0]


class ConvNextV2ForMaskedImageModeling(ConvNextV2PreTrainedModel):
    """ConvNeXt V2 with FCMAE masked image modeling: a sparse encoder, a light decoder and a masked pixel loss.

    The encoder weights live under the same names as [`ConvNextV2Model`]'s, so a pre-trained checkpoint loads into
    [`ConvNextV2ForImageClassification`] (only the final LayerNorm and classifier are new) and
    [`ConvNextV2Backbone`].

    Example:

    ```python
    >>> import torch
    >>> from convnextv2_hf import ConvNextV2Config, ConvNextV2ForMaskedImageModeling
    >>> model = ConvNextV2ForMaskedImageModeling(ConvNextV2Config.from_preset("atto", decoder_hidden_size=64))
    >>> out = model(torch.randn(2, 3, 64, 96), generator=torch.Generator().manual_seed(0))
    >>> out.logits.shape, out.reconstruction.shape, int(out.mask.sum(1)[0])
    (torch.Size([2, 6, 3072]), torch.Size([2, 3, 64, 96]), 4)
    ```
    """

    def __init__(self, config: ConvNextV2Config):
        super().__init__(config)
        self.convnextv2 = ConvNextV2Model(config, add_pooling_layer=False)
        self.decoder = FCMAEDecoder(config)
        self.post_init()

    @property
    def mask_cell_size(self) -> int:
        return self.config.mask_cell_size

    def grid_size(self, pixel_values: torch.Tensor) -> tuple[int, int]:
        cell = self.mask_cell_size
        return pixel_values.shape[-2] // cell, pixel_values.shape[-1] // cell

    def resolve_mask(self, pixel_values, bool_masked_pos=None, noise=None, generator=None, checked=False) -> torch.Tensor:
        """The (N, h, w) bool cell mask: the given one (per cell or per smaller patch), or one drawn at mask_ratio.
        `checked`: the caller vouches for the mask's values, which are then not read back."""
        n = pixel_values.shape[0]
        h, w = self.grid_size(pixel_values)
        if bool_masked_pos is None:
            if noise is None and generator is None:
                noise = torch.randn(n, h * w, device=pixel_values.device)
            mask = random_masking(n, (h, w), self.config.mask_ratio, noise=noise, generator=generator)
            return mask.to(pixel_values.device).view(n, h, w)
        if not isinstance(bool_masked_pos, torch.Tensor):
            raise ValueError(f"`bool_masked_pos` must be a torch.Tensor, got {type(bool_masked_pos).__name__}.")
        if bool_masked_pos.dtype.is_floating_point or bool_masked_pos.is_complex():
            raise ValueError(f"`bool_masked_pos` must be a bool (or 0/1 integer) tensor, got {bool_masked_pos.dtype}.")
        if bool_masked_pos.dtype != torch.bool:
            if not (checked or torch.compiler.is_exporting()) and ((bool_masked_pos != 0) & (bool_masked_pos != 1)).any():
                raise ValueError("`bool_masked_pos` must only contain 0 (visible) and 1 (masked).")
            bool_masked_pos = bool_masked_pos.bool()
        if bool_masked_pos.dim() not in (2, 3) or bool_masked_pos.shape[0] != n:
            raise ValueError(f"`bool_masked_pos` must have shape ({n}, {h * w}) or ({n}, {h}, {w}), got "
                             f"{tuple(bool_masked_pos.shape)}.")
        if bool_masked_pos.shape[1:] not in ((h * w,), (h, w)):
            bool_masked_pos = cells_from_patches(bool_masked_pos, (h, w), self.mask_cell_size,
                                                 tuple(pixel_values.shape[-2:]))
        return bool_masked_pos.to(pixel_values.device).reshape(n, h, w)

    def visible_cells(self, mask: torch.Tensor, bool_masked_pos, visible_cells_per_image: int | None) -> int | None:
        """Check the mask and return its visible cells per image when every image has as many (else None).

        Drawn here or vouched for by the caller (`visible_cells_per_image`, e.g. the FCMAE collator, which checked the
        masks on the host): the count is known without looking at the mask, so nothing waits for the device. A mask
        given without a count is read once (one device sync) to check it and count its cells."""
        cells = mask[0].numel()
        known = num_visible_cells(cells, self.config.mask_ratio) if bool_masked_pos is None else visible_cells_per_image
        if known is None and torch.compiler.is_exporting():  # value checks cannot be traced
            return None
        if known is None:
            visible = (~mask.flatten(1)).sum(1)
            fewest, most = (int(bound) for bound in torch.aminmax(visible))
        else:
            fewest = most = known
        if fewest <= 0:
            raise ValueError(
                f"Every image needs at least one visible mask cell; got a mask of {cells} cells with none "
                "visible (images too small for the mask cell, or a fully masked `bool_masked_pos`)."
            )
        if fewest >= cells:
            raise ValueError("The mask hides no cell, but the FCMAE loss is only defined on masked cells.")
        return fewest if fewest == most and self.config.mask_strategy != "mixmae" else None

    def mask_sources(self, pixel_values: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The images the sparse encoder sees with their masks: the input, or (MixMAE) the input and its partner,
        each source's cells encoded as their own sparse set so the sources do not mix in the 7x7 convolutions."""
        if self.config.mask_strategy != "mixmae":
            return pixel_values, mask
        if pixel_values.shape[0] < 2:
            raise ValueError("mask_strategy='mixmae' mixes each image with the batch-flipped one: use a batch of 2 or more.")
        return torch.cat([pixel_values, pixel_values.flip(0)]), torch.cat([mask, ~mask])

    def forward_encoder(self, sources: torch.Tensor, masks: torch.Tensor, output_hidden_states: bool = False,
                        visible_per_image: int | None = None):
        """Sparse encoding of the visible cells: the last stage's map (zero at masked cells) and the hidden states."""
        backend = get_sparse_backend(self.config.sparse_backend)
        return backend.encode(self.convnextv2, sources, masks, grn_scope=self.config.sparse_grn_scope,
                              output_hidden_states=output_hidden_states, visible_per_image=visible_per_image)

    def forward_decoder(self, encoded: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        """One pixel prediction per cell, `(N, num_cells, cell * cell * num_channels)`."""
        return self.decoder(encoded, masks).flatten(2).transpose(1, 2)

    def forward_loss(self, sources: torch.Tensor, logits: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        """Mean squared error per cell against the (optionally per-patch normalised) pixels, over masked cells."""
        target = patchify(sources, self.mask_cell_size)
        if self.config.norm_pix_loss:
            target = normalize_patches(target)
        per_cell = F.mse_loss(logits.float(), target.float(), reduction="none").mean(dim=-1)
        weights = masks.flatten(1).to(per_cell.dtype)
        return (per_cell * weights).sum() / weights.sum().clamp_min(1.0)

    @can_return_tuple
    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        bool_masked_pos: torch.Tensor | None = None,
        noise: torch.Tensor | None = None,
        output_hidden_states: bool | int | list[int] | None = None,
        generator: torch.Generator | None = None,
        visible_cells_per_image: int | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> ConvNextV2MaskedImageModelingOutput:
        r"""
        Args:
            pixel_values (`torch.FloatTensor` of shape `(batch_size, num_channels, height, width)`):
                Normalised images; height and width must be multiples of `config.mask_cell_size`.
            bool_masked_pos (`torch.BoolTensor` of shape `(batch_size, num_cells)` or `(batch_size, h, w)`, *optional*):
                `True` where a cell is masked. A mask per smaller patch (e.g. SimMIM's, per `config.patch_size`) is
                accepted when it is constant within each cell. When omitted a mask is drawn with `config.mask_ratio`.
            noise (`torch.FloatTensor` of shape `(batch_size, num_cells)`, *optional*):
                Makes the drawn mask reproducible: the cells with the lowest noise stay visible.
            output_hidden_states (`bool`, `int` or `list[int]`, *optional*):
                Also return the sparse encoder's stem and stage outputs (all, or those at the given indices).
            generator (`torch.Generator`, *optional*):
                Random generator for drawing the mask (on the CPU) when neither a mask nor noise is given.
            visible_cells_per_image (`int`, *optional*):
                With `bool_masked_pos`: the number of visible cells in every image of it, when the caller drew or
                checked the mask (the FCMAE collator does). The mask is then not read back to be checked, so the
                forward and backward passes never wait for the GPU and compile to static shapes.
        """
        check_kwargs(self, kwargs, ("pixel_values", "bool_masked_pos", "noise", "output_hidden_states", "generator",
                                    "visible_cells_per_image"))
        check_pixel_values(pixel_values, self.config, self.convnextv2.embeddings.patch_embeddings.weight.dtype, True)
        if output_hidden_states is None:
            output_hidden_states = self.config.output_hidden_states
        vouched = visible_cells_per_image if bool_masked_pos is not None else None
        mask = self.resolve_mask(pixel_values, bool_masked_pos, noise, generator, checked=vouched is not None)
        per_image = self.visible_cells(mask, bool_masked_pos, vouched)
        sources, masks = self.mask_sources(pixel_values, mask)
        encoded, hidden_states = self.forward_encoder(sources, masks, capture_requested(output_hidden_states),
                                                      per_image)
        logits = self.forward_decoder(encoded, masks)
        loss = self.forward_loss(sources, logits, masks)
        return self.build_output(pixel_values, mask, loss, logits, hidden_states, output_hidden_states)

    def build_output(self, pixel_values, mask, loss, logits, hidden_states, output_hidden_states):
        """Predictions folded back to images; with MixMAE the partner's predictions and the mixed input beside."""
        n = pixel_values.shape[0]
        reconstruction = unpatchify(logits, self.mask_cell_size, mask.shape[-2:], self.config.num_channels)
        extra = {}
        if self.config.mask_strategy == "mixmae":
            full_mask = upsample_mask(mask, tuple(pixel_values.shape[-2:])).to(pixel_values.dtype)
            extra = dict(partner_logits=logits[n:], partner_reconstruction=reconstruction[n:],
                         mixed_pixel_values=pixel_values * (1 - full_mask) + pixel_values.flip(0) * full_mask)
        if hidden_states is not None:  # MixMAE: 2N maps, the sources' own encodings and then their partners'
            hidden_states = select_hidden_states(hidden_states, output_hidden_states)
        return ConvNextV2MaskedImageModelingOutput(
            loss=loss, logits=logits[:n], reconstruction=reconstruction[:n], mask=mask.flatten(1).to(logits.dtype),
            hidden_states=hidden_states, **extra,
        )


__all__ = [
    "ConvNextV2PreTrainedModel",
    "ConvNextV2Model",
    "ConvNextV2ForImageClassification",
    "ConvNextV2Backbone",
    "ConvNextV2ForMaskedImageModeling",
    "ConvNextV2MaskedImageModelingOutput",
]
