"""Execution backends for the FCMAE sparse encoder.

The sparse encoder computes only at visible sites (submanifold semantics, SPEC section 2). A backend runs the
weights of a [`ConvNextV2Model`] with those semantics; every backend must give the same numbers, so they can be
swapped through `config.sparse_backend` without changing results.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .grn import apply_grn, relative_response
from .masking import upsample_mask
from .sparse_layout import dense_conv_to_sparse, dense_dwconv_to_sparse


def sparse_grn(grn: nn.Module, x: torch.Tensor, scope: str) -> torch.Tensor:
    """GRN over visible sites only. `x` is channels-last (N, H, W, C) and already zero at masked sites.

    `scope="batch"` takes one L2 norm over the visible sites of the whole batch, as the reference's sparse GRN does;
    `scope="sample"` takes it per image.
    """
    if not hasattr(grn, "weight"):  # GRN disabled (use_grn=False)
        return x
    dims = (0, 1, 2) if scope == "batch" else (1, 2)
    global_norm = torch.linalg.vector_norm(x, ord=2, dim=dims, keepdim=True)
    return apply_grn(x, grn.weight, grn.bias, relative_response(global_norm))


class SparseEncoderBackend:
    """Interface: run the stem and stages of `model` on `pixel_values` seeing only the visible cells of `mask`."""

    name = "abstract"

    def encode(
        self,
        model: nn.Module,
        pixel_values: torch.Tensor,
        mask: torch.Tensor,
        grn_scope: str = "batch",
        output_hidden_states: bool = False,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...] | None]:
        """Return the last stage's map (N, C, h, w), zero at masked cells, and optionally every stage's map.

        `model` is a [`ConvNextV2Model`]; `mask` is the (N, h, w) bool cell mask, `True` = masked.
        """
        raise NotImplementedError


class DenseMaskedBackend(SparseEncoderBackend):
    """Dense convolutions on the full grid, re-masking after every op that could make a masked site non-zero.

    With masked sites held at zero, a dense depthwise convolution evaluated at visible sites equals the submanifold
    sparse convolution, so this reproduces the sparse engine exactly, at the cost of computing masked sites too.
    """

    name = "dense"

    def encode(self, model, pixel_values, mask, grn_scope="batch", output_hidden_states=False):
        visible = ~mask
        x = model.embeddings(pixel_values)
        keep = upsample_mask(visible, tuple(x.shape[-2:])).to(x.dtype)
        x = x * keep
        hidden_states = (x,) if output_hidden_states else None
        for stage in model.encoder.stages:
            if len(stage.downsampling_layer):
                norm, conv = stage.downsampling_layer
                x = conv(norm(x) * keep)
                keep = upsample_mask(visible, tuple(x.shape[-2:])).to(x.dtype)
                x = x * keep
            keep_last = keep.permute(0, 2, 3, 1)
            for layer in stage.layers:
                y = (layer.dwconv(x) * keep).permute(0, 2, 3, 1)
                y = layer.act(layer.pwconv1(layer.layernorm(y))) * keep_last
                y = sparse_grn(layer.grn, y, grn_scope)
                y = layer.pwconv2(y).permute(0, 3, 1, 2)
                x = (x + layer.drop_path(y)) * keep
            if output_hidden_states:
                hidden_states = hidden_states + (x,)
        return x, hidden_states


def scatter_to_grid(rows: torch.Tensor, flat: torch.Tensor, batch_size: int, size: tuple[int, int]) -> torch.Tensor:
    """Rows (V, C) placed at flat raster indices of an (N, H, W, C) grid that is zero everywhere else."""
    dense = rows.new_zeros(batch_size * size[0] * size[1], rows.shape[1]).index_copy(0, flat, rows)
    return dense.view(batch_size, *size, rows.shape[1])


class SiteIndex:
    """The visible sites of one stage: flat indices into (N * H * W) in raster order, and each row's sample."""

    def __init__(self, visible: torch.Tensor, size: tuple[int, int]):
        n = visible.shape[0]
        self.batch_size, self.size = n, size
        full = upsample_mask(visible, size).reshape(-1)
        self.flat = full.nonzero().squeeze(1)
        self.sample = torch.div(self.flat, size[0] * size[1], rounding_mode="floor")

    @property
    def num_sites(self) -> int:
        return self.batch_size * self.size[0] * self.size[1]

    def gather(self, dense_last: torch.Tensor) -> torch.Tensor:
        """(N, H, W, C) -> packed rows (V, C)."""
        return dense_last.reshape(self.num_sites, -1).index_select(0, self.flat)

    def scatter(self, rows: torch.Tensor) -> torch.Tensor:
        """Packed rows (V, C) -> (N, H, W, C), zero at masked sites."""
        return scatter_to_grid(rows, self.flat, self.batch_size, self.size)

    def coordinates(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(sample, row, column) of every visible site."""
        local = self.flat - self.sample * (self.size[0] * self.size[1])
        return self.sample, torch.div(local, self.size[1], rounding_mode="floor"), local % self.size[1]

    def children(self, finer: "SiteIndex") -> torch.Tensor:
        """Row indices in `finer` of the 2x2 children of each site here, shape (V, 4), order (0,0) (0,1) (1,0) (1,1)."""
        fine_h, fine_w = finer.size
        row_of = torch.full((finer.num_sites,), -1, dtype=torch.long, device=self.flat.device)
        row_of[finer.flat] = torch.arange(finer.flat.numel(), device=self.flat.device)
        sample, y, x = self.coordinates()
        base = sample * (fine_h * fine_w) + (2 * y) * fine_w + 2 * x
        offsets = torch.tensor([0, 1, fine_w, fine_w + 1], device=base.device)
        return row_of[base[:, None] + offsets]


def sparse_grn_rows(grn: nn.Module, rows: torch.Tensor, sample: torch.Tensor, batch_size: int, scope: str) -> torch.Tensor:
    """GRN on packed visible rows (V, C); `sample` gives each row's image. Norm per image or over all rows."""
    if not hasattr(grn, "weight"):
        return rows
    weight, bias = grn.weight.reshape(1, -1), grn.bias.reshape(1, -1)
    if scope == "batch":
        relative = relative_response(torch.linalg.vector_norm(rows, ord=2, dim=0, keepdim=True))
    else:
        squares = rows.new_zeros(batch_size, rows.shape[1]).index_add(0, sample, rows * rows)
        # `tiny` keeps the gradient of sqrt finite for a channel that is zero in every row of a sample
        global_norm = (squares + torch.finfo(squares.dtype).tiny).sqrt()
        relative = relative_response(global_norm).index_select(0, sample)
    return apply_grn(rows, weight, bias, relative)


def drop_path_rows(drop_path: nn.Module, rows: torch.Tensor, sample: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Stochastic depth on packed rows: one keep/drop draw per image, as the dense DropPath does."""
    prob = getattr(drop_path, "drop_prob", 0.0)
    if prob == 0.0 or not drop_path.training:
        return rows
    keep = rows.new_empty(batch_size).bernoulli_(1.0 - prob) / (1.0 - prob)
    return rows * keep.index_select(0, sample)[:, None]


def block_rows(layer: nn.Module, rows: torch.Tensor, conv_rows: torch.Tensor, sample: torch.Tensor,
               batch_size: int, scope: str) -> torch.Tensor:
    """The per-site part of a ConvNeXt V2 block on packed rows, given the depthwise conv output `conv_rows`."""
    y = layer.act(layer.pwconv1(layer.layernorm(conv_rows)))
    y = layer.pwconv2(sparse_grn_rows(layer.grn, y, sample, batch_size, scope))
    return rows + drop_path_rows(layer.drop_path, y, sample, batch_size)


def depthwise_conv_rows(conv: nn.Conv2d, rows: torch.Tensor, sites: SiteIndex) -> torch.Tensor:
    """The depthwise convolution at the visible sites: scatter to a channels-last grid, convolve, gather back."""
    return sites.gather(conv(sites.scatter(rows).permute(0, 3, 1, 2)).permute(0, 2, 3, 1))


class GatherScatterBackend(SparseEncoderBackend):
    """Per-site work on the visible rows only, packed as (num_visible, C).

    LayerNorm, both Linear layers, GELU, GRN, residual and drop path run on the packed rows; only the 7x7 depthwise
    convolution scatters to a channels-last grid and gathers back; the 2x2 downsampling multiplies the four
    children of each visible cell (all visible, since masks are aligned across stages) by the reshaped kernel.
    At mask ratio r this does about (1 - r) of the dense backend's per-site work.
    """

    name = "gather"

    def encode(self, model, pixel_values, mask, grn_scope="batch", output_hidden_states=False):
        visible = ~mask
        stem = model.embeddings(pixel_values).permute(0, 2, 3, 1)
        sites = SiteIndex(visible, tuple(stem.shape[1:3]))
        rows = sites.gather(stem)
        hidden_states = (sites.scatter(rows).permute(0, 3, 1, 2),) if output_hidden_states else None
        for stage in model.encoder.stages:
            if len(stage.downsampling_layer):
                norm, conv = stage.downsampling_layer
                coarse = SiteIndex(visible, (sites.size[0] // 2, sites.size[1] // 2))
                rows = F.layer_norm(rows, norm.normalized_shape, norm.weight, norm.bias, norm.eps)
                patches = rows.index_select(0, coarse.children(sites).reshape(-1)).reshape(-1, 4 * rows.shape[1])
                kernel = conv.weight.permute(0, 2, 3, 1).reshape(conv.out_channels, -1)
                rows, sites = F.linear(patches, kernel, conv.bias), coarse
            for layer in stage.layers:
                if torch.is_grad_enabled() and rows.requires_grad:
                    # Recompute the scatter and convolution in backward instead of keeping a dense grid per block:
                    # only the packed rows stay in memory (about (1 - mask ratio) of the grid).
                    conv_rows = checkpoint(depthwise_conv_rows, layer.dwconv, rows, sites, use_reentrant=False)
                else:
                    conv_rows = depthwise_conv_rows(layer.dwconv, rows, sites)
                rows = block_rows(layer, rows, conv_rows, sites.sample, sites.batch_size, grn_scope)
            if output_hidden_states:
                hidden_states = hidden_states + (sites.scatter(rows).permute(0, 3, 1, 2),)
        return sites.scatter(rows).permute(0, 3, 1, 2), hidden_states


def minkowski_engine_available() -> bool:
    try:
        import MinkowskiEngine  # noqa: F401
    except ImportError:
        return False
    return True


class MinkowskiBackend(SparseEncoderBackend):
    """The sparse engine the method was built on: MinkowskiEngine's submanifold convolutions on sparse tensors.

    Our dense weights are used through the sparse engine's kernel layout (SPEC section 3), so gradients reach them
    directly. Per-site work is shared with the gather/scatter backend. Needs `MinkowskiEngine` (see
    `scripts/install_minkowski_engine.sh`).
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

    def _conv(self, module_class, kernel, x, **kwargs):
        """Run an ME convolution module with `kernel` (a differentiable view of our weight) in place of its own."""
        conv = module_class(dimension=2, **kwargs).to(kernel.device)
        del conv.kernel
        conv.kernel = kernel
        return conv(x)

    def encode(self, model, pixel_values, mask, grn_scope="batch", output_hidden_states=False):
        ME = self.ME
        n = pixel_values.shape[0]
        stem = model.embeddings(pixel_values).permute(0, 2, 3, 1)
        sites = SiteIndex(~mask, tuple(stem.shape[1:3]))
        coords = torch.stack(sites.coordinates(), 1).int()
        x = ME.SparseTensor(sites.gather(stem), coordinates=coords, device=str(pixel_values.device))

        def densify(t):
            stride = t.tensor_stride[0]
            c = t.C.long()
            grid = (sites.size[0] // stride, sites.size[1] // stride)
            flat = c[:, 0] * grid[0] * grid[1] + (c[:, 1] // stride) * grid[1] + c[:, 2] // stride
            return scatter_to_grid(t.F, flat, n, grid).permute(0, 3, 1, 2)

        hidden_states = (densify(x),) if output_hidden_states else None
        for stage in model.encoder.stages:
            if len(stage.downsampling_layer):
                norm, conv = stage.downsampling_layer
                normed = F.layer_norm(x.F, norm.normalized_shape, norm.weight, norm.bias, norm.eps)
                x = ME.SparseTensor(normed, coordinate_map_key=x.coordinate_map_key, coordinate_manager=x.coordinate_manager)
                x = self._conv(ME.MinkowskiConvolution, dense_conv_to_sparse(conv.weight), x, in_channels=conv.in_channels,
                               out_channels=conv.out_channels, kernel_size=2, stride=2, bias=False)
                x = ME.SparseTensor(x.F + conv.bias, coordinate_map_key=x.coordinate_map_key, coordinate_manager=x.coordinate_manager)
            sample = x.C[:, 0].long()
            for layer in stage.layers:
                dw = layer.dwconv
                y = self._conv(ME.MinkowskiChannelwiseConvolution, dense_dwconv_to_sparse(dw.weight), x,
                               in_channels=dw.in_channels, kernel_size=dw.kernel_size[0], bias=False)
                rows = block_rows(layer, x.F, y.F + dw.bias, sample, n, grn_scope)
                x = ME.SparseTensor(rows, coordinate_map_key=x.coordinate_map_key, coordinate_manager=x.coordinate_manager)
            if output_hidden_states:
                hidden_states = hidden_states + (densify(x),)
        return densify(x), hidden_states


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
