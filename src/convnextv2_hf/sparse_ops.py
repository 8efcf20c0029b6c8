"""The arithmetic behind the sparse FCMAE encoder: GRN, visible-site indexing, per-row ops, kernel layouts.

Model side: shipped inside FCMAE checkpoints, so it imports only torch and its neighbours.
"""

from __future__ import annotations

import torch
from torch import nn

from .masking import upsample_mask


# --------------------------------------------------------------------------------------------- GRN


def relative_response(global_norm: torch.Tensor) -> torch.Tensor:
    """`N = G / (mean_c G + 1e-6)`: each channel's L2 norm relative to the mean over channels (last dim)."""
    return global_norm / (global_norm.mean(dim=-1, keepdim=True) + 1e-6)


def apply_grn(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, relative: torch.Tensor) -> torch.Tensor:
    """`gamma * (x * N) + beta + x` for channels-last `x`, fused into one pass: `x * (gamma * N + 1) + beta`."""
    return torch.addcmul(bias, x, weight * relative + 1)


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


# --------------------------------------------------------------------------------------------- visible sites


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


# --------------------------------------------------------------------------------------------- per-row ops


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
