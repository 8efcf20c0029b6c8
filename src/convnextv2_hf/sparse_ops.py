"""The arithmetic behind the sparse FCMAE encoder: GRN, visible-site indexing, per-row ops, kernel layouts.

Model side: shipped inside FCMAE checkpoints, so it imports only torch and its neighbours.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .masking import upsample_mask


# --------------------------------------------------------------------------------------------- GRN


def relative_response(global_norm: torch.Tensor) -> torch.Tensor:
    """`N = G / (mean_c G + 1e-6)`: each channel's L2 norm relative to the mean over channels (last dim)."""
    return global_norm / (global_norm.mean(dim=-1, keepdim=True) + 1e-6)


def apply_grn(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, relative: torch.Tensor) -> torch.Tensor:
    """`gamma * (x * N) + beta + x` for channels-last `x`, fused into one pass: `x * (gamma * N + 1) + beta`.
    The statistics (`relative`, fp32 under autocast) meet `x` in its own dtype, so activations stay bf16."""
    return torch.addcmul(bias.to(x.dtype), x, (weight * relative + 1).to(x.dtype))


def channel_norm(x: torch.Tensor, dim) -> torch.Tensor:
    """L2 norm over `dim` in fp32: a bf16 or fp16 sum of squares over thousands of sites loses digits or overflows."""
    return torch.linalg.vector_norm(x, ord=2, dim=dim, keepdim=True, dtype=torch.promote_types(x.dtype, torch.float32))


def sparse_grn(grn: nn.Module, x: torch.Tensor, scope: str) -> torch.Tensor:
    """GRN over visible sites only. `x` is channels-last (N, H, W, C) and already zero at masked sites.

    `scope="batch"` takes one L2 norm over the visible sites of the whole batch, as the reference's sparse GRN does;
    `scope="sample"` takes it per image.
    """
    if not hasattr(grn, "weight"):  # GRN disabled (use_grn=False)
        return x
    dims = (0, 1, 2) if scope == "batch" else (1, 2)
    return apply_grn(x, grn.weight, grn.bias, relative_response(channel_norm(x, dims)))


def sparse_grn_rows(grn: nn.Module, rows: torch.Tensor, sample: torch.Tensor, batch_size: int, scope: str,
                    rows_per_image: int | None = None) -> torch.Tensor:
    """GRN on packed visible rows (V, C); `sample` gives each row's image. Norm per image or over all rows.

    With `rows_per_image` (rows grouped by image, equally many each) the per-image norm is a reshape and a
    reduction: deterministic and without atomics; otherwise the squares are summed by `index_add` (in fp32)."""
    if not hasattr(grn, "weight"):
        return rows
    weight, bias = grn.weight.reshape(1, -1), grn.bias.reshape(1, -1)
    if scope == "batch":
        relative = relative_response(channel_norm(rows, 0))
    elif rows_per_image is not None:
        per_image = relative_response(channel_norm(rows.view(batch_size, rows_per_image, -1), 1))
        return apply_grn(rows.view(batch_size, rows_per_image, -1), weight, bias, per_image).view_as(rows)
    else:
        squares = rows.new_zeros(batch_size, rows.shape[1], dtype=torch.float32).index_add(0, sample, rows.float() ** 2)
        # `tiny` keeps the gradient of sqrt finite for a channel that is zero in every row of a sample
        global_norm = (squares + torch.finfo(squares.dtype).tiny).sqrt()
        relative = relative_response(global_norm).index_select(0, sample)
    return apply_grn(rows, weight, bias, relative)


# --------------------------------------------------------------------------------------------- visible sites


def scatter_to_grid(rows: torch.Tensor, flat: torch.Tensor, batch_size: int, size: tuple[int, int]) -> torch.Tensor:
    """Rows (V, C) placed at flat raster indices of an (N, H, W, C) grid that is zero everywhere else."""
    dense = rows.new_zeros(batch_size * size[0] * size[1], rows.shape[1]).index_copy(0, flat, rows)
    return dense.view(batch_size, *size, rows.shape[1])


def map_from_rows(rows: torch.Tensor, flat: torch.Tensor, batch_size: int, size: tuple[int, int]) -> torch.Tensor:
    """Rows (V, C) at flat raster indices -> a channels-first (N, C, H, W) map, zero everywhere else."""
    return scatter_to_grid(rows, flat, batch_size, size).permute(0, 3, 1, 2)


def rows_from_map(feature_map: torch.Tensor, flat: torch.Tensor) -> torch.Tensor:
    """A channels-first (N, C, H, W) map -> its rows (V, C) at flat raster indices."""
    return feature_map.permute(0, 2, 3, 1).reshape(-1, feature_map.shape[1]).index_select(0, flat)


class SiteIndex:
    """The visible sites of one stage: flat indices into (N * H * W), and each row's sample.

    With `per_image` (the number of visible mask cells, equal in every image, as FCMAE draws them) the sites are
    found by arithmetic, with shapes known in advance: no `nonzero`, so building them never waits for the GPU, and
    `torch.compile` sees static shapes. Rows are then grouped by image, cell by cell (visible cells in raster order,
    each cell's sites in raster order). Without it, `nonzero` finds them in raster order (masks with other counts).
    """

    def __init__(self, visible: torch.Tensor, size: tuple[int, int], per_image: int | None = None):
        n, h, w = visible.shape
        self.batch_size, self.size, self.per_image = n, size, per_image
        self.scale = (size[0] // h, size[1] // w)
        device = visible.device
        if per_image is None:
            self.flat = upsample_mask(visible, size).reshape(-1).nonzero().squeeze(1)
            self.sample = torch.div(self.flat, size[0] * size[1], rounding_mode="floor")
            return
        # visible cells first, each image's in raster order (a stable sort of the 0/1 masked flags)
        cells = torch.argsort((~visible).reshape(n, h * w).to(torch.uint8), dim=1, stable=True)[:, :per_image]
        sy, sx = self.scale
        dy = torch.arange(sy, device=device).view(sy, 1)
        dx = torch.arange(sx, device=device).view(1, sx)
        y = (cells // w).view(n, per_image, 1, 1) * sy + dy
        x = (cells % w).view(n, per_image, 1, 1) * sx + dx
        image = torch.arange(n, device=device).view(n, 1, 1, 1)
        self.flat = (image * (size[0] * size[1]) + y * size[1] + x).reshape(-1)
        self.sample = image.view(n, 1).expand(n, self.rows_per_image).reshape(-1)

    @property
    def rows_per_image(self) -> int | None:
        """Rows of each image when all images have as many (`per_image` given), else None."""
        return None if self.per_image is None else self.per_image * self.scale[0] * self.scale[1]

    @property
    def num_sites(self) -> int:
        return self.batch_size * self.size[0] * self.size[1]

    def gather(self, dense_last: torch.Tensor) -> torch.Tensor:
        """(N, H, W, C) -> packed rows (V, C)."""
        return dense_last.reshape(self.num_sites, -1).index_select(0, self.flat)

    def coordinates(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(sample, row, column) of every visible site."""
        local = self.flat - self.sample * (self.size[0] * self.size[1])
        return self.sample, torch.div(local, self.size[1], rounding_mode="floor"), local % self.size[1]

    def children(self, finer: "SiteIndex") -> torch.Tensor:
        """Row indices in `finer` of the 2x2 children of each site here, shape (V, 4), order (0,0) (0,1) (1,0) (1,1)."""
        fine_h, fine_w = finer.size
        device = self.flat.device
        if self.per_image is not None and finer.per_image == self.per_image:
            # both stages list cell by cell: a site (cell, dy, dx) has children (cell, 2dy + a, 2dx + b)
            (sy, sx), (fy, fx) = self.scale, finer.scale
            cell = torch.arange(self.batch_size * self.per_image, device=device).view(-1, 1, 1)
            dy = torch.arange(sy, device=device).view(1, sy, 1)
            dx = torch.arange(sx, device=device).view(1, 1, sx)
            first = cell * (fy * fx) + (2 * dy) * fx + 2 * dx
            return first.reshape(-1, 1) + window_offsets(fx, device)
        row_of = torch.full((finer.num_sites,), -1, dtype=torch.long, device=device)
        row_of[finer.flat] = torch.arange(finer.flat.numel(), device=device)
        sample, y, x = self.coordinates()
        base = sample * (fine_h * fine_w) + (2 * y) * fine_w + 2 * x
        return row_of[base[:, None] + window_offsets(fine_w, device)]


class VisibleDepthwiseConv(torch.autograd.Function):
    """A depthwise convolution evaluated at the visible sites only: packed rows (V, C) in, packed rows out.

    Forward scatters the rows to a zero grid, convolves and gathers the visible sites. Backward rebuilds the input
    grid from the saved rows (one scatter) and places the output gradient on the grid (zero at masked sites): no
    dense grid is kept between the passes and, unlike activation checkpointing, the convolution does not run again.
    Sites are unique, so both scatters are `index_copy` (no atomics: deterministic). Under autocast the convolution
    runs in the autocast dtype in both passes, as `F.conv2d` would.
    """

    @staticmethod
    def forward(ctx, rows, weight, bias, flat, batch_size: int, size: tuple[int, int], padding: tuple[int, int]):
        grid = map_from_rows(rows, flat, batch_size, size)
        out = F.conv2d(grid, weight, bias, padding=padding, groups=weight.shape[0])  # autocast casts here
        ctx.save_for_backward(rows, weight, flat)
        ctx.grid, ctx.padding, ctx.dtype = (batch_size, size), padding, out.dtype
        return rows_from_map(out, flat)

    @staticmethod
    def backward(ctx, grad_rows):
        rows, weight, flat = ctx.saved_tensors
        grad_rows = grad_rows.to(ctx.dtype)
        grad_grid = map_from_rows(grad_rows, flat, *ctx.grid)
        grad_input = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_input = torch.nn.grad.conv2d_input((ctx.grid[0], rows.shape[1], *ctx.grid[1]), weight.to(ctx.dtype),
                                                    grad_grid, padding=ctx.padding, groups=weight.shape[0])
            grad_input = rows_from_map(grad_input, flat)
        if ctx.needs_input_grad[1]:
            grid = map_from_rows(rows.to(ctx.dtype), flat, *ctx.grid)
            grad_weight = torch.nn.grad.conv2d_weight(grid, weight.shape, grad_grid, padding=ctx.padding,
                                                      groups=weight.shape[0]).to(weight.dtype)
        if ctx.needs_input_grad[2]:
            grad_bias = grad_rows.sum(0, dtype=torch.float32).to(weight.dtype)  # masked sites add nothing
        return grad_input, grad_weight, grad_bias, None, None, None, None


def visible_depthwise_conv(conv: nn.Conv2d, rows: torch.Tensor, sites: "SiteIndex") -> torch.Tensor:
    """`conv` (depthwise, stride 1, zero padding) at the visible sites of `sites`, on packed rows."""
    return VisibleDepthwiseConv.apply(rows, conv.weight, conv.bias, sites.flat, sites.batch_size, sites.size,
                                      conv.padding)


def window_offsets(width: int, device) -> torch.Tensor:
    """(1, 4) offsets of a 2x2 window's cells from its top-left one in a raster of `width` columns."""
    return (torch.arange(2, device=device).view(2, 1) * width + torch.arange(2, device=device)).view(1, 4)


# --------------------------------------------------------------------------------------------- per-row ops


def drop_path_rows(drop_path: nn.Module, rows: torch.Tensor, sample: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Stochastic depth on packed rows: one keep/drop draw per image, as the dense DropPath does."""
    prob = getattr(drop_path, "drop_prob", 0.0)
    if prob == 0.0 or not drop_path.training:
        return rows
    keep = rows.new_empty(batch_size).bernoulli_(1.0 - prob) / (1.0 - prob)
    return rows * keep.index_select(0, sample)[:, None]


def block_rows(layer: nn.Module, rows: torch.Tensor, conv_rows: torch.Tensor, sample: torch.Tensor,
               batch_size: int, scope: str, rows_per_image: int | None = None) -> torch.Tensor:
    """The per-site part of a ConvNeXt V2 block on packed rows, given the depthwise conv output `conv_rows`."""
    y = layer.act(layer.pwconv1(layer.layernorm(conv_rows)))
    y = layer.pwconv2(sparse_grn_rows(layer.grn, y, sample, batch_size, scope, rows_per_image))
    return rows + drop_path_rows(layer.drop_path, y, sample, batch_size)


# --------------------------------------------------------------------------------------------- kernel layouts


def sparse_dwconv_to_dense(kernel: torch.Tensor) -> torch.Tensor:
    """Sparse-engine depthwise kernel (k*k, C) -> Conv2d weight (C, 1, k, k) (SPEC section 3)."""
    area, channels = kernel.shape
    k = int(round(area**0.5))
    return kernel.permute(1, 0).reshape(channels, 1, k, k).transpose(3, 2).contiguous()


def dense_dwconv_to_sparse(weight: torch.Tensor) -> torch.Tensor:
    channels, _, k, _ = weight.shape
    return weight.transpose(3, 2).reshape(channels, k * k).permute(1, 0).contiguous()


def sparse_conv_to_dense(kernel: torch.Tensor) -> torch.Tensor:
    """Sparse-engine kernel (k*k, C_in, C_out) -> Conv2d weight (C_out, C_in, k, k) (SPEC section 3)."""
    area, c_in, c_out = kernel.shape
    k = int(round(area**0.5))
    return kernel.permute(2, 1, 0).reshape(c_out, c_in, k, k).transpose(3, 2).contiguous()


def dense_conv_to_sparse(weight: torch.Tensor) -> torch.Tensor:
    c_out, c_in, k, _ = weight.shape
    return weight.transpose(3, 2).reshape(c_out, c_in, k * k).permute(2, 1, 0).contiguous()
