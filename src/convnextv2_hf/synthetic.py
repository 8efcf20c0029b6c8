"""Procedurally generated images: data that needs no download, for smoke runs and tests."""

from __future__ import annotations

import torch


def shape_images(count: int, size: int = 64, seed: int = 0) -> torch.Tensor:
    """`count` images (N, 3, size, size) of coloured rectangles on a gradient, roughly unit-normalised."""
    generator = torch.Generator().manual_seed(seed)
    ramp = torch.linspace(-1, 1, size)
    images = torch.empty(count, 3, size, size)
    for i in range(count):
        colour = torch.rand(3, 1, 1, generator=generator) * 2 - 1
        images[i] = colour * ramp.view(1, 1, size) * 0.5
        for _ in range(3):
            y0, x0 = torch.randint(0, size * 3 // 4, (2,), generator=generator).tolist()
            h, w = torch.randint(size // 8, size // 3, (2,), generator=generator).tolist()
            images[i, :, y0 : y0 + h, x0 : x0 + w] = torch.rand(3, 1, 1, generator=generator) * 3 - 1.5
    return images
