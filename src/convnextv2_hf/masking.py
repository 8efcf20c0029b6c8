"""FCMAE masks and patch (un)folding, shared by the model and the image processor.

Conventions (SPEC section 2): a mask lives on the coarsest feature grid, one cell per
`cell x cell` pixels; `True`/1 means masked (hidden from the encoder), `False`/0 visible.
"""

from __future__ import annotations

import torch


def num_visible_cells(num_cells: int, mask_ratio: float) -> int:
    """Number of cells left visible: `int(L * (1 - mask_ratio))`, as in the reference implementation."""
    return int(num_cells * (1 - mask_ratio))


def random_masking(
    batch_size: int,
    grid_size: tuple[int, int],
    mask_ratio: float,
    noise: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Draw one FCMAE mask per sample, shape `(batch_size, h * w)`, `True` = masked.

    Exactly `int(L * (1 - mask_ratio))` cells per sample stay visible: those with the lowest `noise`
    (drawn from a standard normal with `generator` when not given).
    """
    if not 0.0 < mask_ratio < 1.0:
        raise ValueError(f"`mask_ratio` must be strictly between 0 and 1, got {mask_ratio}.")
    num_cells = grid_size[0] * grid_size[1]
    if noise is None:
        noise = torch.randn(batch_size, num_cells, generator=generator, device=device or "cpu")
    elif noise.shape != (batch_size, num_cells):
        raise ValueError(f"`noise` must have shape {(batch_size, num_cells)}, got {tuple(noise.shape)}.")
    len_keep = num_visible_cells(num_cells, mask_ratio)
    rank = torch.argsort(torch.argsort(noise, dim=1), dim=1)
    return rank >= len_keep


def upsample_mask(mask: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Repeat a `(N, h, w)` cell mask to `(N, 1, H, W)` with `H, W` integer multiples of `h, w`."""
    n, h, w = mask.shape
    if size[0] % h or size[1] % w:
        raise ValueError(f"Cannot upsample a {h}x{w} mask to {size[0]}x{size[1]}.")
    return mask.view(n, h, 1, w, 1).expand(n, h, size[0] // h, w, size[1] // w).reshape(n, 1, *size)


def patchify(images: torch.Tensor, cell: int) -> torch.Tensor:
    """`(N, C, H, W)` -> `(N, L, cell * cell * C)`, pixels ordered (row-in-patch, column-in-patch, channel)."""
    n, c, height, width = images.shape
    h, w = height // cell, width // cell
    x = images.reshape(n, c, h, cell, w, cell)
    x = torch.einsum("nchpwq->nhwpqc", x)
    return x.reshape(n, h * w, cell * cell * c)


def unpatchify(patches: torch.Tensor, cell: int, grid_size: tuple[int, int], num_channels: int = 3) -> torch.Tensor:
    """Inverse of [`patchify`]: `(N, L, cell * cell * C)` -> `(N, C, H, W)`."""
    n = patches.shape[0]
    h, w = grid_size
    x = patches.reshape(n, h, w, cell, cell, num_channels)
    x = torch.einsum("nhwpqc->nchpwq", x)
    return x.reshape(n, num_channels, h * cell, w * cell)


def normalize_patches(patches: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Per-patch `(x - mean) / sqrt(var + eps)` with the unbiased variance (`norm_pix_loss`)."""
    mean = patches.mean(dim=-1, keepdim=True)
    var = patches.var(dim=-1, keepdim=True)
    return (patches - mean) / (var + eps) ** 0.5


def mask_image(pixel_values: torch.Tensor, mask: torch.Tensor, fill: float = 0.0) -> torch.Tensor:
    """Blank the masked cells of `(N, C, H, W)` images; `mask` is the `(N, h, w)` cell mask."""
    full = upsample_mask(mask.bool(), tuple(pixel_values.shape[-2:]))
    return pixel_values.masked_fill(full, fill)
