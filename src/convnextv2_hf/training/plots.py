"""Pictures of a training run, drawn with matplotlib without a display: reconstructions of masked images and
learning curves."""

from __future__ import annotations

import torch

from ..masking import mask_image, patchify, unpatchify
from .data.transforms import denormalize


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def reconstruction_in_pixels(output, pixel_values: torch.Tensor, cell: int, norm_pix_loss: bool) -> torch.Tensor:
    """Predicted images in input units: per-patch de-normalised under `norm_pix_loss`, visible cells from the input."""
    logits = output.logits.detach().float()
    pixels = pixel_values.detach().float()
    grid = (pixels.shape[-2] // cell, pixels.shape[-1] // cell)
    if norm_pix_loss:
        target = patchify(pixels, cell)
        mean, var = target.mean(-1, keepdim=True), target.var(-1, keepdim=True)
        logits = logits * (var + 1e-6).sqrt() + mean
    mask = output.mask.view(-1, 1, *grid).float()
    mask = torch.nn.functional.interpolate(mask, scale_factor=cell, mode="nearest")
    predicted = unpatchify(logits, cell, grid, pixels.shape[1])
    return pixels * (1 - mask) + predicted * mask


def save_reconstruction_grid(model, pixel_values: torch.Tensor, path: str, mean, std, bool_masked_pos=None, max_images=8):
    """PNG with one row per image: input, masked input, reconstruction (visible cells pasted back)."""
    plt = _pyplot()
    model.eval()
    pixel_values = pixel_values[:max_images]
    with torch.no_grad():
        output = model(pixel_values, bool_masked_pos=None if bool_masked_pos is None else bool_masked_pos[:max_images])
    cell = model.config.mask_cell_size
    grid = (pixel_values.shape[-2] // cell, pixel_values.shape[-1] // cell)
    masked = mask_image(pixel_values.float(), output.mask.view(-1, *grid), fill=float("nan"))
    recon = reconstruction_in_pixels(output, pixel_values, cell, model.config.norm_pix_loss)
    panels = [as_rgb(denormalize(t.cpu(), mean, std)) for t in (pixel_values.float(), masked, recon)]
    rows = pixel_values.shape[0]
    fig, axes = plt.subplots(rows, 3, figsize=(6, 2 * rows), squeeze=False)
    for r in range(rows):
        for c, (title, images) in enumerate(zip(("input", "masked (blue)", "reconstruction"), panels)):
            axes[r, c].imshow(images[r].permute(1, 2, 0).numpy())
            axes[r, c].axis("off")
            if r == 0:
                axes[r, c].set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


MASKED_COLOUR = (0.25, 0.45, 0.85)  # neither black nor white, the colours of strokes and backgrounds


def as_rgb(images: torch.Tensor) -> torch.Tensor:
    """`(N, C, H, W)` images in [0, 1] as RGB for display, masked (NaN) pixels in [`MASKED_COLOUR`]."""
    images = images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images[:, :3]
    colour = torch.tensor(MASKED_COLOUR).view(1, 3, 1, 1).expand_as(images)
    return torch.where(images.isnan(), colour, images.clamp(0, 1))


def save_curves(curves: dict[str, tuple[list[float], list[float]]], path: str, title: str, xlabel: str = "step",
                ylabel: str = "loss", bands: dict[str, tuple[list[float], list[float]]] | None = None,
                logx: bool = False, tick_labels: dict[float, str] | None = None,
                ylim: tuple[float, float] | None = None):
    """PNG of one or more named (x, y) curves, each in the legend; `bands` optionally adds (low, high) shading per
    curve, `tick_labels` names x values on a log axis, `ylim` fixes the y range instead of zooming to the data."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5) if logx else (6, 4))
    if logx:
        xs = sorted({x for xs, _ in curves.values() for x in xs})
        ax.set_xscale("log")
        ax.set_xticks(xs, [(tick_labels or {}).get(x, f"{x:g}") for x in xs])
        ax.minorticks_off()
    for name, (xs, ys) in curves.items():
        line = ax.plot(xs, ys, label=name, marker="o" if logx else None, markersize=3)[0]
        if bands and name in bands:
            low, high = bands[name]
            ax.fill_between(xs, low, high, color=line.get_color(), alpha=0.2)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if ylim is not None:
        ax.set_ylim(*ylim)
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
