"""Model cards for checkpoints produced by the example scripts and the demo, built with `huggingface_hub`."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from huggingface_hub import EvalResult, ModelCard, ModelCardData

TEMPLATE = """---
{{ card_data }}
---

# {{ model_name }}

{{ summary }}

## Model

ConvNeXt V2 ({{ architecture }}): depths {{ depths }}, widths {{ widths }}, {{ params_m }} M parameters,
stem stride {{ stem }} (mask cell {{ cell }} px). Implemented by
[convnextv2-hf](https://github.com/convnextv2-hf/convnextv2-hf), weights in the transformers ConvNeXt V2 layout.

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


def build_model_card(model, info: CardInfo) -> ModelCard:
    """A `ModelCard` with `model-index` metadata for `model` (a ConvNeXt V2 model of this package)."""
    config = model.config
    fcmae = type(model).__name__ == "ConvNextV2ForMaskedImageModeling"
    card_data = ModelCardData(
        model_name=info.model_name,
        library_name="transformers",
        license="apache-2.0",
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
        params_m=f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}",
        stem=config.stem_stride,
        cell=config.mask_cell_size,
        data=info.data,
        recipe=info.recipe,
        results=info.results,
        plots=info.plots,
        usage=usage,
    )


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
