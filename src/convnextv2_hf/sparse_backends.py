"""Execution backends for the FCMAE sparse encoder.

The sparse encoder computes only at visible sites (submanifold semantics, SPEC section 2). A backend runs the
weights of a [`ConvNextV2Model`] with those semantics; every backend must give the same numbers, so they can be
swapped through `config.sparse_backend` without changing results.
"""

from __future__ import annotations

import torch
from torch import nn

from .masking import upsample_mask


def sparse_grn(grn: nn.Module, x: torch.Tensor, scope: str) -> torch.Tensor:
    """GRN over visible sites only. `x` is channels-last (N, H, W, C) and already zero at masked sites.

    `scope="batch"` takes one L2 norm over the visible sites of the whole batch, as the reference's sparse GRN does;
    `scope="sample"` takes it per image.
    """
    if not hasattr(grn, "weight"):  # GRN disabled (use_grn=False)
        return x
    dims = (0, 1, 2) if scope == "batch" else (1, 2)
    global_norm = torch.linalg.vector_norm(x, ord=2, dim=dims, keepdim=True)
    relative = global_norm / (global_norm.mean(dim=-1, keepdim=True) + 1e-6)
    return grn.weight * (x * relative) + grn.bias + x


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


SPARSE_BACKENDS: dict[str, type[SparseEncoderBackend]] = {
    DenseMaskedBackend.name: DenseMaskedBackend,
}


def get_sparse_backend(name: str) -> SparseEncoderBackend:
    """Instantiate the backend registered under `name` (see `SPARSE_BACKENDS`)."""
    if name not in SPARSE_BACKENDS:
        raise ValueError(f"Unknown sparse backend {name!r}; available: {sorted(SPARSE_BACKENDS)}.")
    return SPARSE_BACKENDS[name]()
