"""Execution backends for the FCMAE sparse encoder.

The sparse encoder computes only at visible sites (submanifold semantics, SPEC section 2). A backend runs the
weights of a [`ConvNextV2Model`] with those semantics; every backend must give the same numbers, so they can be
swapped through `config.sparse_backend` without changing results.

[`SparseEncoderBackend`] owns the walk over stem, stages and blocks (hidden states, gradient checkpointing); a
backend only says how to embed, downsample and run one block on its own representation of the visible sites.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .masking import upsample_mask
from .sparse_ops import (
    SiteIndex,
    block_rows,
    dense_conv_to_sparse,
    dense_dwconv_to_sparse,
    map_from_rows,
    rows_from_map,
    sparse_grn,
    visible_depthwise_conv,
)


class SparseBlockCall(NamedTuple):
    """Passed to a block's `forward` as `sparse=`: run the block on this backend's visible sites. Calling the block
    module (rather than its parts) keeps module hooks and transformers' gradient checkpointing working."""

    backend: "SparseEncoderBackend"
    sites: Any
    grn_scope: str

    def run(self, layer: nn.Module, features: torch.Tensor) -> torch.Tensor:
        return self.backend.block(layer, features, self.sites, self.grn_scope)


def checkpointing(layer: nn.Module) -> bool:
    """Whether `model.gradient_checkpointing_enable()` asked this block to be recomputed in backward."""
    return getattr(layer, "gradient_checkpointing", False) and layer.training and torch.is_grad_enabled()


class SparseEncoderBackend:
    """Run the stem and stages of a [`ConvNextV2Model`] seeing only the visible cells of a mask.

    A backend represents the visible sites as `(features, sites)`: `features` is the one differentiable tensor,
    `sites` whatever structure locates it. Subclasses implement `embed`, `downsample`, `block` and `to_map`.
    """

    name = "abstract"
    per_image: int | None = None

    def encode(
        self,
        model: nn.Module,
        pixel_values: torch.Tensor,
        mask: torch.Tensor,
        grn_scope: str = "batch",
        output_hidden_states: bool = False,
        visible_per_image: int | None = None,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...] | None]:
        """Return the last stage's map (N, C, h, w), zero at masked cells, and optionally every stage's map.

        `model` is a [`ConvNextV2Model`]; `mask` is the (N, h, w) bool cell mask, `True` = masked. Returned hidden
        states lie on the path to the output, so gradients of anything computed from the output reach them.
        `visible_per_image`: the number of visible cells, when every image has that many (sites are then found by
        arithmetic, without waiting for the device).
        """
        self.per_image = visible_per_image
        visible = ~mask
        features, sites = self.embed(model.embeddings, pixel_values, visible)
        hidden_states = []
        if output_hidden_states:
            features = self.capture(features, sites, hidden_states)
        for index, stage in enumerate(model.encoder.stages):
            if index > 0:
                features, sites = self.downsample(stage.downsampling_layer, features, sites, visible)
            for layer in stage.layers:
                features = self.run_block(layer, features, sites, grn_scope)
            if output_hidden_states:
                features = self.capture(features, sites, hidden_states)
        return self.to_map(features, sites), tuple(hidden_states) if output_hidden_states else None

    def run_block(self, layer: nn.Module, features: torch.Tensor, sites: Any, grn_scope: str) -> torch.Tensor:
        return layer(features, sparse=SparseBlockCall(self, sites, grn_scope))

    def capture(self, features: torch.Tensor, sites: Any, hidden_states: list) -> torch.Tensor:
        """Append the dense map of `features` and continue from it, so the map stays in the autograd graph."""
        feature_map = self.to_map(features, sites)
        hidden_states.append(feature_map)
        return self.from_map(feature_map, sites)

    def embed(self, embeddings: nn.Module, pixel_values: torch.Tensor, visible: torch.Tensor):
        raise NotImplementedError

    def downsample(self, layers: nn.ModuleList, features: torch.Tensor, sites: Any, visible: torch.Tensor):
        raise NotImplementedError

    def block(self, layer: nn.Module, features: torch.Tensor, sites: Any, grn_scope: str) -> torch.Tensor:
        raise NotImplementedError

    def to_map(self, features: torch.Tensor, sites: Any) -> torch.Tensor:
        """(N, C, H, W) map, zero at masked sites."""
        raise NotImplementedError

    def from_map(self, feature_map: torch.Tensor, sites: Any) -> torch.Tensor:
        raise NotImplementedError


class DenseMaskedBackend(SparseEncoderBackend):
    """Dense convolutions on the full grid, re-masking after every op that could make a masked site non-zero.

    With masked sites held at zero, a dense depthwise convolution evaluated at visible sites equals the submanifold
    sparse convolution, so this reproduces the sparse engine exactly, at the cost of computing masked sites too.
    `sites` is the (N, 1, H, W) 0/1 keep map of the current stage.
    """

    name = "dense"

    def embed(self, embeddings, pixel_values, visible):
        x = embeddings(pixel_values)
        keep = upsample_mask(visible, tuple(x.shape[-2:])).to(x.dtype)
        return x * keep, keep

    def downsample(self, layers, features, sites, visible):
        norm, conv = layers
        x = conv(norm(features) * sites)
        keep = upsample_mask(visible, tuple(x.shape[-2:])).to(x.dtype)
        return x * keep, keep

    def block(self, layer, features, sites, grn_scope):
        keep_last = sites.permute(0, 2, 3, 1)
        y = (layer.dwconv(features) * sites).permute(0, 2, 3, 1)
        y = layer.act(layer.pwconv1(layer.layernorm(y))) * keep_last
        y = layer.pwconv2(sparse_grn(layer.grn, y, grn_scope)).permute(0, 3, 1, 2)
        return (features + layer.drop_path(y)) * sites

    def to_map(self, features, sites):
        return features

    def from_map(self, feature_map, sites):
        return feature_map


def depthwise_conv_rows(conv: nn.Conv2d, rows: torch.Tensor, sites: SiteIndex) -> torch.Tensor:
    """The depthwise convolution at the visible sites: scatter to a grid, convolve, gather back."""
    return rows_from_map(conv(map_from_rows(rows, sites.flat, sites.batch_size, sites.size)), sites.flat)


class GatherScatterBackend(SparseEncoderBackend):
    """Per-site work on the visible rows only, packed as (num_visible, C); `sites` is a [`SiteIndex`].

    LayerNorm, both Linear layers, GELU, GRN, residual and drop path run on the packed rows; only the 7x7 depthwise
    convolution scatters to a channels-last grid and gathers back; the 2x2 downsampling multiplies the four
    children of each visible cell (all visible, since masks are aligned across stages) by the reshaped kernel.
    At mask ratio r this does about (1 - r) of the dense backend's per-site work.
    """

    name = "gather"

    def embed(self, embeddings, pixel_values, visible):
        stem = embeddings(pixel_values).permute(0, 2, 3, 1)
        sites = SiteIndex(visible, tuple(stem.shape[1:3]), self.per_image)
        return sites.gather(stem), sites

    def downsample(self, layers, features, sites, visible):
        norm, conv = layers
        coarse = SiteIndex(visible, (sites.size[0] // 2, sites.size[1] // 2), self.per_image)
        rows = F.layer_norm(features, norm.normalized_shape, norm.weight, norm.bias, norm.eps)
        patches = rows.index_select(0, coarse.children(sites).reshape(-1)).reshape(-1, 4 * rows.shape[1])
        kernel = conv.weight.permute(0, 2, 3, 1).reshape(conv.out_channels, -1)
        return F.linear(patches, kernel, conv.bias), coarse

    def block(self, layer, features, sites, grn_scope):
        if torch.is_grad_enabled():
            # only the packed rows stay in memory for backward (about (1 - mask ratio) of the grid), not a grid
            conv_rows = visible_depthwise_conv(layer.dwconv, features, sites)
        else:
            conv_rows = depthwise_conv_rows(layer.dwconv, features, sites)
        return block_rows(layer, features, conv_rows, sites.sample, sites.batch_size, grn_scope, sites.rows_per_image)

    def to_map(self, features, sites):
        return map_from_rows(features, sites.flat, sites.batch_size, sites.size)

    def from_map(self, feature_map, sites):
        return rows_from_map(feature_map, sites.flat)


def minkowski_engine_available() -> bool:
    try:
        import MinkowskiEngine  # noqa: F401
    except ImportError:
        return False
    return True


class MinkowskiSites:
    """Where a MinkowskiEngine stage's rows live: its coordinate map, and the dense grid they scatter to."""

    def __init__(self, tensor, batch_size: int, stem_size: tuple[int, int]):
        self.key, self.manager = tensor.coordinate_map_key, tensor.coordinate_manager
        stride = tensor.tensor_stride[0]
        coords = tensor.C.long()
        self.sample = coords[:, 0]
        self.batch_size, self.stem_size = batch_size, stem_size
        self.size = (stem_size[0] // stride, stem_size[1] // stride)
        self.flat = self.sample * self.size[0] * self.size[1] + (coords[:, 1] // stride) * self.size[1] + coords[:, 2] // stride


class MinkowskiBackend(SparseEncoderBackend):
    """The sparse engine the method was built on: MinkowskiEngine's submanifold convolutions on sparse tensors.

    Our dense weights are used through the sparse engine's kernel layout (SPEC section 3), so gradients reach them
    directly. Per-site work is shared with the gather/scatter backend. Needs `MinkowskiEngine` (see
    `scripts/install_minkowski_engine.sh`); gradient checkpointing and `torch.export` are not supported.
    """

    name = "minkowski"

    def __init__(self):
        try:
            import MinkowskiEngine as ME
        except ImportError as error:
            raise ImportError(
                "sparse_backend='minkowski' needs MinkowskiEngine, which is not importable here "
                f"({error}). Build it with `bash scripts/install_minkowski_engine.sh`, or use sparse_backend='gather' "
                "(pure PyTorch, same numbers)."
            ) from None
        self.ME = ME

    def encode(self, model, pixel_values, mask, grn_scope="batch", output_hidden_states=False, visible_per_image=None):
        if torch.compiler.is_exporting():
            raise RuntimeError("sparse_backend='minkowski' cannot be exported; set config.sparse_backend='gather' "
                               "(same numbers) before torch.export.")
        return super().encode(model, pixel_values, mask, grn_scope, output_hidden_states, visible_per_image)

    def run_block(self, layer, features, sites, grn_scope):
        if checkpointing(layer):
            raise ValueError("Gradient checkpointing is not supported with sparse_backend='minkowski'; use "
                             "sparse_backend='gather' (same numbers) or call model.gradient_checkpointing_disable().")
        return super().run_block(layer, features, sites, grn_scope)

    def _tensor(self, features, sites: MinkowskiSites):
        return self.ME.SparseTensor(features, coordinate_map_key=sites.key, coordinate_manager=sites.manager)

    def _conv(self, module_class, kernel, x, **kwargs):
        """Run an ME convolution module with `kernel` (a differentiable view of our weight) in place of its own."""
        conv = module_class(dimension=2, **kwargs).to(kernel.device)
        del conv.kernel
        conv.kernel = kernel
        return conv(x)

    def embed(self, embeddings, pixel_values, visible):
        stem = embeddings(pixel_values).permute(0, 2, 3, 1)
        index = SiteIndex(visible, tuple(stem.shape[1:3]))
        coords = torch.stack(index.coordinates(), 1).int()
        x = self.ME.SparseTensor(index.gather(stem), coordinates=coords, device=str(pixel_values.device))
        return x.F, MinkowskiSites(x, visible.shape[0], index.size)

    def downsample(self, layers, features, sites, visible):
        norm, conv = layers
        normed = F.layer_norm(features, norm.normalized_shape, norm.weight, norm.bias, norm.eps)
        x = self._conv(self.ME.MinkowskiConvolution, dense_conv_to_sparse(conv.weight), self._tensor(normed, sites),
                       in_channels=conv.in_channels, out_channels=conv.out_channels, kernel_size=2, stride=2, bias=False)
        return x.F + conv.bias, MinkowskiSites(x, sites.batch_size, sites.stem_size)

    def block(self, layer, features, sites, grn_scope):
        dw = layer.dwconv
        y = self._conv(self.ME.MinkowskiChannelwiseConvolution, dense_dwconv_to_sparse(dw.weight),
                       self._tensor(features, sites), in_channels=dw.in_channels, kernel_size=dw.kernel_size[0],
                       bias=False)
        return block_rows(layer, features, y.F + dw.bias, sites.sample, sites.batch_size, grn_scope)

    # rows at flat raster sites of a grid, as the gather backend's
    to_map, from_map = GatherScatterBackend.to_map, GatherScatterBackend.from_map


SPARSE_BACKENDS: dict[str, type[SparseEncoderBackend]] = {
    DenseMaskedBackend.name: DenseMaskedBackend,
    GatherScatterBackend.name: GatherScatterBackend,
    MinkowskiBackend.name: MinkowskiBackend,
}


def get_sparse_backend(name: str) -> SparseEncoderBackend:
    """Instantiate the backend registered under `name` (see `SPARSE_BACKENDS`)."""
    if name not in SPARSE_BACKENDS:
        raise ValueError(f"Unknown sparse backend {name!r}; available: {sorted(SPARSE_BACKENDS)}.")
    return SPARSE_BACKENDS[name]()
