"""PyTorch ConvNeXt V2 models: backbone, image classifier and FCMAE masked image modeling.

Parameter names and shapes follow `transformers`' ConvNeXt V2 exactly, so checkpoints cross over both ways.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.modeling_outputs import (
    BaseModelOutputWithPoolingAndNoAttention,
    ImageClassifierOutputWithNoAttention,
)
from transformers.utils import ModelOutput

from .configuration_convnextv2 import ConvNextV2Config
from .grn import apply_grn, relative_response
from .masking import normalize_patches, patchify, random_masking, unpatchify, upsample_mask
from .sparse_backends import get_sparse_backend


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
        global_norm = torch.linalg.vector_norm(x, ord=2, dim=(1, 2), keepdim=True)
        return apply_grn(x, self.weight, self.bias, relative_response(global_norm))


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
        check_pixel_values(pixel_values, self.num_channels)
        return self.layernorm(self.patch_embeddings(pixel_values))


def _has_fused_linear_gelu() -> bool:
    try:
        return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    except (AttributeError, RuntimeError):
        return False


_FUSED_LINEAR_GELU = _has_fused_linear_gelu()


def linear_gelu(linear: nn.Linear, act: nn.Module, x: torch.Tensor, exact_gelu: bool) -> torch.Tensor:
    """`act(linear(x))`; for eager fp32 CPU inference one fused oneDNN kernel computes the same exact-erf GELU
    (about 4x faster than the two ops; `torch.compile` does its own fusion, so it gets the plain ops)."""
    if (exact_gelu and _FUSED_LINEAR_GELU and not torch.compiler.is_compiling() and not torch.is_grad_enabled()
            and x.device.type == "cpu"
            and x.dtype == torch.float32 and linear.weight.dtype == torch.float32 and not torch.is_autocast_enabled("cpu")):
        return torch.ops.mkldnn._linear_pointwise(x.contiguous(), linear.weight, linear.bias, "gelu", [], "none")
    return act(linear(x))


class ConvNextV2Layer(nn.Module):
    """ConvNeXt V2 block: dwconv 7x7 -> LN -> Linear(4C) -> GELU -> GRN -> Linear(C), plus residual."""

    def __init__(self, config: ConvNextV2Config, dim: int, drop_path: float = 0.0):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, kernel_size=7, padding=3, groups=dim)
        self.layernorm = ConvNextV2LayerNorm(dim, eps=1e-6)
        self.pwconv1 = nn.Linear(dim, 4 * dim)
        self.act = ACT2FN[config.hidden_act]
        self.exact_gelu = config.hidden_act == "gelu"
        self.grn = ConvNextV2GRN(4 * dim) if getattr(config, "use_grn", True) else nn.Identity()
        self.pwconv2 = nn.Linear(4 * dim, dim)
        self.drop_path = ConvNextV2DropPath(drop_path) if drop_path > 0.0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.dwconv(x).permute(0, 2, 3, 1)
        y = self.grn(linear_gelu(self.pwconv1, self.act, self.layernorm(y), self.exact_gelu))
        y = self.pwconv2(y).permute(0, 3, 1, 2)
        return x + self.drop_path(y)


class ConvNextV2Stage(nn.Module):
    """Optional downsampling (LN + 2x2 stride-2 conv) followed by `depth` blocks."""

    def __init__(self, config, in_channels: int, out_channels: int, depth: int, drop_path_rates: list[float]):
        super().__init__()
        if in_channels != out_channels:
            self.downsampling_layer = nn.ModuleList(
                [
                    ConvNextV2LayerNorm(in_channels, eps=1e-6, data_format="channels_first"),
                    nn.Conv2d(in_channels, out_channels, kernel_size=2, stride=2),
                ]
            )
        else:
            self.downsampling_layer = nn.ModuleList()
        self.layers = nn.ModuleList(ConvNextV2Layer(config, out_channels, rate) for rate in drop_path_rates)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.downsampling_layer:
            x = layer(x)
        for layer in self.layers:
            x = layer(x)
        return x


class ConvNextV2Encoder(nn.Module):
    def __init__(self, config: ConvNextV2Config):
        super().__init__()
        rates = torch.linspace(0, config.drop_path_rate, sum(config.depths), device="cpu").split(config.depths)
        self.stages = nn.ModuleList()
        previous = config.hidden_sizes[0]
        for i in range(config.num_stages):
            if i > 0 and config.hidden_sizes[i] == previous:
                raise ValueError("Consecutive stages must change width (the downsampling layer depends on it).")
            self.stages.append(
                ConvNextV2Stage(config, previous, config.hidden_sizes[i], config.depths[i], rates[i].tolist())
            )
            previous = config.hidden_sizes[i]

    def forward(self, x: torch.Tensor, output_hidden_states: bool = False):
        hidden_states = (x,) if output_hidden_states else None
        for stage in self.stages:
            x = stage(x)
            if output_hidden_states:
                hidden_states = hidden_states + (x,)
        return x, hidden_states


def check_pixel_values(pixel_values: torch.Tensor, num_channels: int, cell: int | None = None) -> None:
    """Raise a `ValueError` naming the problem if `pixel_values` is not a valid `(N, C, H, W)` batch."""
    if not isinstance(pixel_values, torch.Tensor):
        raise ValueError(f"`pixel_values` must be a torch.Tensor, got {type(pixel_values).__name__}.")
    if pixel_values.dim() != 4:
        raise ValueError(f"`pixel_values` must have shape (batch, channels, height, width), got {tuple(pixel_values.shape)}.")
    if pixel_values.shape[1] != num_channels:
        raise ValueError(
            f"`pixel_values` has {pixel_values.shape[1]} channels but the model expects {num_channels} "
            f"(config.num_channels); shape {tuple(pixel_values.shape)}."
        )
    if cell is not None:
        height, width = pixel_values.shape[-2:]
        if height % cell or width % cell:
            raise ValueError(
                f"Image height and width must be multiples of the mask cell ({cell} px, the network's total "
                f"stride), got {height}x{width}. Resize or crop, e.g. to {max(cell, height // cell * cell)}x"
                f"{max(cell, width // cell * cell)}."
            )


class ConvNextV2PreTrainedModel(PreTrainedModel):
    config_class = ConvNextV2Config
    config: ConvNextV2Config
    base_model_prefix = "convnextv2"
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    _no_split_modules = ["ConvNextV2Layer"]

    @torch.no_grad()
    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, ConvNextV2GRN):
            init.zeros_(module.weight)
            init.zeros_(module.bias)
        elif isinstance(module, FCMAEDecoder):
            init.normal_(module.mask_token, std=0.02)


class ConvNextV2Model(ConvNextV2PreTrainedModel):
    """ConvNeXt V2 backbone: stem, four stages and (with `add_pooling_layer`) global pooling + LayerNorm."""

    def __init__(self, config: ConvNextV2Config, add_pooling_layer: bool = True):
        super().__init__(config)
        self.embeddings = ConvNextV2Embeddings(config)
        self.encoder = ConvNextV2Encoder(config)
        self.layernorm = nn.LayerNorm(config.hidden_sizes[-1], eps=config.layer_norm_eps) if add_pooling_layer else None
        self.post_init()

    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPoolingAndNoAttention | tuple:
        r"""
        Args:
            pixel_values (`torch.FloatTensor` of shape `(batch_size, num_channels, height, width)`):
                Normalised images, e.g. from [`ConvNextV2ImageProcessor`].
            output_hidden_states (`bool`, *optional*):
                Also return the stem output and every stage's output.
            return_dict (`bool`, *optional*):
                Return a [`~transformers.utils.ModelOutput`] instead of a tuple.
        """
        if pixel_values is None:
            raise ValueError("You have to specify pixel_values")
        output_hidden_states = (
            output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        )
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        # Channels-last memory makes every per-block permute a free view and suits the depthwise convolution.
        embedded = self.embeddings(pixel_values).contiguous(memory_format=torch.channels_last)
        last_hidden_state, hidden_states = self.encoder(embedded, output_hidden_states)
        pooled = self.layernorm(last_hidden_state.mean([-2, -1])) if self.layernorm is not None else None
        if not return_dict:
            return tuple(v for v in (last_hidden_state, pooled, hidden_states) if v is not None)
        return BaseModelOutputWithPoolingAndNoAttention(
            last_hidden_state=last_hidden_state, pooler_output=pooled, hidden_states=hidden_states
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

    accepts_loss_kwargs = False

    def __init__(self, config: ConvNextV2Config):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.convnextv2 = ConvNextV2Model(config)
        self.classifier = (
            nn.Linear(config.hidden_sizes[-1], config.num_labels) if config.num_labels > 0 else nn.Identity()
        )
        self.post_init()

    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> ImageClassifierOutputWithNoAttention | tuple:
        r"""
        Args:
            pixel_values (`torch.FloatTensor` of shape `(batch_size, num_channels, height, width)`):
                Normalised images.
            labels (`torch.LongTensor` of shape `(batch_size,)`, *optional*):
                Class indices; with them the output carries the loss (cross-entropy for single-label problems).
        """
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        outputs = self.convnextv2(pixel_values, output_hidden_states=output_hidden_states, return_dict=True)
        logits = self.classifier(outputs.pooler_output)
        loss = None
        if labels is not None:
            loss = self.loss_function(labels=labels, pooled_logits=logits, config=self.config)
        if not return_dict:
            output = (logits,) + ((outputs.hidden_states,) if outputs.hidden_states is not None else ())
            return ((loss,) + output) if loss is not None else output
        return ImageClassifierOutputWithNoAttention(loss=loss, logits=logits, hidden_states=outputs.hidden_states)


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
        mask (`torch.BoolTensor` of shape `(batch_size, num_cells)`):
            The mask used, `True` = masked.
        hidden_states (`tuple(torch.FloatTensor)`, *optional*):
            Stem output and every stage's output of the sparse encoder, zero at masked positions.
        partner_logits, partner_reconstruction (*optional*, `mask_strategy="mixmae"` only):
            Predictions for the partner image (`pixel_values.flip(0)`), whose pixels fill the masked cells of the
            mixed input, at the cells it did not show (`~mask`).
        mixed_pixel_values (*optional*, `mask_strategy="mixmae"` only):
            The mixed input `x * (1 - m) + x.flip(0) * m` that the two sparse encodings together see.
    """

    loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    reconstruction: torch.FloatTensor | None = None
    mask: torch.BoolTensor | None = None
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


class ConvNextV2ForMaskedImageModeling(ConvNextV2PreTrainedModel):
    """ConvNeXt V2 with FCMAE masked image modeling: a sparse encoder, a light decoder and a masked pixel loss.

    The encoder weights live under the same names as [`ConvNextV2Model`]'s, so a pre-trained checkpoint loads into
    [`ConvNextV2ForImageClassification`] (only the final LayerNorm and classifier are new).

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

    def _resolve_mask(
        self,
        pixel_values: torch.Tensor,
        bool_masked_pos: torch.Tensor | None,
        noise: torch.Tensor | None,
        generator: torch.Generator | None,
    ) -> torch.Tensor:
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
            if ((bool_masked_pos != 0) & (bool_masked_pos != 1)).any():
                raise ValueError("`bool_masked_pos` must only contain 0 (visible) and 1 (masked).")
            bool_masked_pos = bool_masked_pos.bool()
        if bool_masked_pos.shape not in ((n, h * w), (n, h, w)):
            raise ValueError(
                f"`bool_masked_pos` must have shape ({n}, {h * w}) or ({n}, {h}, {w}) for images of "
                f"{tuple(pixel_values.shape[-2:])} px (mask cell {self.mask_cell_size} px), got {tuple(bool_masked_pos.shape)}."
            )
        return bool_masked_pos.to(pixel_values.device).reshape(n, h, w)

    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        bool_masked_pos: torch.Tensor | None = None,
        noise: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        generator: torch.Generator | None = None,
        **kwargs,
    ) -> ConvNextV2MaskedImageModelingOutput | tuple:
        r"""
        Args:
            pixel_values (`torch.FloatTensor` of shape `(batch_size, num_channels, height, width)`):
                Normalised images; height and width must be multiples of `config.mask_cell_size`.
            bool_masked_pos (`torch.BoolTensor` of shape `(batch_size, num_cells)` or `(batch_size, h, w)`, *optional*):
                `True` where a cell is masked. When omitted a mask is drawn with `config.mask_ratio`.
            noise (`torch.FloatTensor` of shape `(batch_size, num_cells)`, *optional*):
                Makes the drawn mask reproducible: the cells with the lowest noise stay visible.
            generator (`torch.Generator`, *optional*):
                Random generator for drawing the mask (on the CPU) when neither a mask nor noise is given.
        """
        if pixel_values is None:
            raise ValueError("You have to specify pixel_values")
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        output_hidden_states = (
            output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        )
        cell = self.mask_cell_size
        check_pixel_values(pixel_values, self.config.num_channels, cell)
        mask = self._resolve_mask(pixel_values, bool_masked_pos, noise, generator)
        flat_mask = mask.flatten(1)
        if (~flat_mask).sum(1).eq(0).any():
            raise ValueError(
                f"Every image needs at least one visible mask cell; got a mask of {flat_mask.shape[1]} cells with none "
                "visible (images too small for the mask cell, or a fully masked `bool_masked_pos`)."
            )
        if not flat_mask.any():
            raise ValueError("The mask hides no cell, but the FCMAE loss is only defined on masked cells.")

        mixmae = self.config.mask_strategy == "mixmae"
        sources, masks = pixel_values, mask
        if mixmae:
            if pixel_values.shape[0] < 2:
                raise ValueError("mask_strategy='mixmae' mixes each image with the batch-flipped one: use a batch of 2 or more.")
            # Source 1 shows its visible cells, source 2 (the partner) fills the masked ones. Encoding each source's
            # cells as its own sparse set keeps the sources from mixing in the 7x7 convolutions.
            sources, masks = torch.cat([pixel_values, pixel_values.flip(0)]), torch.cat([mask, ~mask])

        backend = get_sparse_backend(self.config.sparse_backend)
        encoded, hidden_states = backend.encode(
            self.convnextv2, sources, masks, grn_scope=self.config.sparse_grn_scope,
            output_hidden_states=output_hidden_states,
        )
        logits = self.decoder(encoded, masks).flatten(2).transpose(1, 2)

        target = patchify(sources, cell)
        if self.config.norm_pix_loss:
            target = normalize_patches(target)
        per_cell = F.mse_loss(logits.float(), target.float(), reduction="none").mean(dim=-1)
        weights = masks.flatten(1).to(per_cell.dtype)
        loss = (per_cell * weights).sum() / weights.sum().clamp_min(1.0)
        reconstruction = unpatchify(logits, cell, mask.shape[-2:], self.config.num_channels)

        extra = {}
        if mixmae:
            n = pixel_values.shape[0]
            full_mask = upsample_mask(mask, tuple(pixel_values.shape[-2:])).to(pixel_values.dtype)
            extra = dict(
                partner_logits=logits[n:], partner_reconstruction=reconstruction[n:],
                mixed_pixel_values=pixel_values * (1 - full_mask) + pixel_values.flip(0) * full_mask,
            )
            logits, reconstruction = logits[:n], reconstruction[:n]
            if hidden_states is not None:
                hidden_states = tuple(h[:n] for h in hidden_states)
        if not return_dict:
            output = (logits, reconstruction, flat_mask) + ((hidden_states,) if hidden_states is not None else ())
            return (loss,) + output
        return ConvNextV2MaskedImageModelingOutput(
            loss=loss, logits=logits, reconstruction=reconstruction, mask=flat_mask, hidden_states=hidden_states, **extra
        )


def optimize_for_inference(model: ConvNextV2PreTrainedModel, compile: bool = False, **compile_kwargs):
    """Prepare a model for fast inference: eval mode, channels-last weights, and (opt-in) `torch.compile`.

    Outputs are unchanged up to float rounding. Compilation takes a while on the first call and needs a C++
    compiler on CPU.

    Example:

    ```python
    >>> import torch
    >>> from convnextv2_hf import ConvNextV2Config, ConvNextV2ForImageClassification
    >>> from convnextv2_hf.modeling_convnextv2 import optimize_for_inference
    >>> model = optimize_for_inference(ConvNextV2ForImageClassification(ConvNextV2Config.from_preset("atto")))
    >>> with torch.inference_mode():
    ...     logits = model(torch.randn(1, 3, 224, 224)).logits
    ```
    """
    model.eval()
    model.to(memory_format=torch.channels_last)
    if compile:
        model.forward = torch.compile(model.forward, **compile_kwargs)
    return model


__all__ = [
    "optimize_for_inference",
    "ConvNextV2PreTrainedModel",
    "ConvNextV2Model",
    "ConvNextV2ForImageClassification",
    "ConvNextV2ForMaskedImageModeling",
    "ConvNextV2MaskedImageModelingOutput",
]
