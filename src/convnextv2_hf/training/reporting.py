"""Reports of a training run: reconstruction and learning-curve pictures (matplotlib, no display needed) and
hub-ready model cards with `model-index` results (built with `huggingface_hub`)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
from huggingface_hub import EvalResult, ModelCard, ModelCardData

from .. import __version__
from ..masking import mask_image, patchify, unpatchify
from .augmentation import denormalize


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
    panels = [denormalize(t.cpu(), mean, std) for t in (pixel_values.float(), masked, recon)]
    rows = pixel_values.shape[0]
    fig, axes = plt.subplots(rows, 3, figsize=(6, 2 * rows), squeeze=False)
    for r in range(rows):
        for c, (title, images) in enumerate(zip(("input", "masked", "reconstruction"), panels)):
            image = images[r].permute(1, 2, 0).numpy()
            axes[r, c].imshow(image.squeeze() if image.shape[-1] == 1 else image, cmap="gray" if image.shape[-1] == 1 else None)
            axes[r, c].axis("off")
            if r == 0:
                axes[r, c].set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def save_curves(curves: dict[str, tuple[list[float], list[float]]], path: str, title: str, xlabel: str = "step",
                ylabel: str = "loss", bands: dict[str, tuple[list[float], list[float]]] | None = None,
                logx: bool = False):
    """PNG of one or more named (x, y) curves; `bands` optionally adds (low, high) shading per curve."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5) if logx else (6, 4))
    if logx:
        xs = sorted({x for xs, _ in curves.values() for x in xs})
        ax.set_xscale("log")
        ax.set_xticks(xs, [f"{x:g}" for x in xs])
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
    if len(curves) > 1:
        ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------------------------- model cards


TEMPLATE = """---
{{ card_data }}
---

# {{ model_name }}

{{ summary }}

## Model

ConvNeXt V2 ({{ architecture }}): depths {{ depths }}, widths {{ widths }}, {{ params_m }} M parameters,
stem stride {{ stem }} (mask cell {{ cell }} px). {{ made_by }} with the `convnextv2-hf` Python package (version
{{ version }}); the weights use transformers' ConvNeXt V2 layout.

## Data

{{ data }}

## Training recipe

{% for key, value in recipe.items() -%}
- **{{ key }}**: {{ value }}
{% endfor %}
{% if results %}
## Results

| metric | value |
|---|---|
{% for key, value in results.items() -%}
| {{ key }} | {{ value }} |
{% endfor %}
{% endif %}
{% for title, path in plots.items() -%}
### {{ title }}

![{{ title }}]({{ path }})

{% endfor -%}
## How to use

```python
{{ usage }}
```
"""


@dataclass
class CardInfo:
    """What a card says; `results` and `eval_results` hold measured numbers only."""

    model_name: str
    summary: str
    data: str
    recipe: dict[str, str] = field(default_factory=dict)
    results: dict[str, str] = field(default_factory=dict)
    eval_results: list[EvalResult] = field(default_factory=list)
    plots: dict[str, str] = field(default_factory=dict)
    datasets: list[str] | None = None
    base_model: str | None = None
    tags: list[str] = field(default_factory=list)
    license: str = "apache-2.0"
    made_by: str = "Trained"  # "Converted" for weights this package did not train


def build_model_card(model, info: CardInfo) -> ModelCard:
    """A `ModelCard` with `model-index` metadata for `model` (a ConvNeXt V2 model of this package)."""
    config = model.config
    fcmae = type(model).__name__ == "ConvNextV2ForMaskedImageModeling"
    card_data = ModelCardData(
        model_name=info.model_name,
        library_name="transformers",
        license=info.license,
        pipeline_tag=None if fcmae else "image-classification",
        tags=["convnextv2", "convnextv2-hf", "vision"] + (["fcmae", "masked-image-modeling"] if fcmae else []) + info.tags,
        datasets=info.datasets,
        base_model=info.base_model,
        eval_results=info.eval_results or None,
        metrics=sorted({r.metric_type for r in info.eval_results}) or None,
    )
    if fcmae:
        usage = (
            "import convnextv2_hf  # registers the classes; or pass trust_remote_code=True without it\n"
            "from transformers import AutoModelForMaskedImageModeling, AutoModelForImageClassification\n"
            f"model = AutoModelForMaskedImageModeling.from_pretrained(\"{info.model_name}\")\n"
            "# fine-tune: the encoder weights load into a classifier (new final norm and head)\n"
            f"classifier = AutoModelForImageClassification.from_pretrained(\"{info.model_name}\", num_labels=10)"
        )
    else:
        usage = (
            "from transformers import pipeline\n"
            f"classify = pipeline(\"image-classification\", model=\"{info.model_name}\")\n"
            "classify(\"image.png\")"
        )
    return ModelCard.from_template(
        card_data,
        template_str=TEMPLATE,
        model_name=info.model_name,
        summary=info.summary,
        architecture=type(model).__name__,
        depths=list(config.depths),
        widths=list(config.hidden_sizes),
        params_m=f"{model.num_parameters() / 1e6:.2f}",
        version=__version__,
        stem=config.stem_stride,
        cell=config.mask_cell_size,
        data=info.data,
        recipe=info.recipe,
        results=info.results,
        plots=info.plots,
        usage=usage,
        made_by=info.made_by,
    )


def start_card(source: str | None) -> dict:
    """The metadata of the card in a local start folder (empty without one): what a model trained from it inherits
    (its `license`, and its `base_model` or the start's own hub id)."""
    path = os.path.join(source or "", "README.md")
    if not source or not os.path.isfile(path):
        return {}
    return ModelCard.load(path).data.to_dict()


def inherited(source: str | None) -> dict:
    """`license` and `base_model` for a card of a model trained from `source` (a local folder or a hub id)."""
    if not source:
        return {}
    if not os.path.isdir(source):
        return {"base_model": source}
    card = start_card(source)
    return {key: card[key] for key in ("license", "base_model") if card.get(key)}


def save_model_card(model, info: CardInfo, output_dir: str) -> ModelCard:
    card = build_model_card(model, info)
    card.save(os.path.join(output_dir, "README.md"))
    return card


def accuracy_eval_results(metrics: dict[str, float], dataset_name: str, dataset_type: str, split: str) -> list[EvalResult]:
    """`model-index` entries for top-1 / top-5 accuracy (values in [0, 1])."""
    names = {"top1_accuracy": ("accuracy", "Top-1 accuracy"), "top5_accuracy": ("top_5_accuracy", "Top-5 accuracy")}
    return [
        EvalResult(
            task_type="image-classification", dataset_type=dataset_type, dataset_name=dataset_name,
            dataset_split=split, metric_type=names[key][0], metric_name=names[key][1], metric_value=round(value, 4),
        )
        for key, value in metrics.items() if key in names
    ]
