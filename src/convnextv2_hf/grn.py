"""Global Response Normalization arithmetic, shared by the dense layer and the sparse backends."""

from __future__ import annotations

import torch


def relative_response(global_norm: torch.Tensor) -> torch.Tensor:
    """`N = G / (mean_c G + 1e-6)`: each channel's L2 norm relative to the mean over channels (last dim)."""
    return global_norm / (global_norm.mean(dim=-1, keepdim=True) + 1e-6)


def apply_grn(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, relative: torch.Tensor) -> torch.Tensor:
    """`gamma * (x * N) + beta + x` for channels-last `x`, fused into one pass: `x * (gamma * N + 1) + beta`."""
    return torch.addcmul(bias, x, weight * relative + 1)
