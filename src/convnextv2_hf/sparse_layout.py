"""The sparse engine's kernel layouts (MinkowskiEngine, used by the reference FCMAE) and ours (Conv2d)."""

from __future__ import annotations

import torch


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
