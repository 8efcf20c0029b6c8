"""Hub-ready model cards (built with `huggingface_hub`): what a folder holds, how it was made, its licence and
`model-index` results, and what a card inherits from the checkpoint it started from. Library level: training,
conversion and export write cards without importing the training toolkit or `datasets`."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from .. import __version__


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



# The Hugging Face Hub's licence identifiers (huggingface.co/docs/hub/repositories-licenses), as of 2026.
HUB_LICENSES = frozenset("""
    apache-2.0 mit openrail bigscience-openrail-m creativeml-openrail-m bigscience-bloom-rail-1.0 bigcode-openrail-m
    afl-3.0 artistic-2.0 bsl-1.0 bsd bsd-2-clause bsd-3-clause bsd-3-clause-clear c-uda cc cc0-1.0 cc-by-2.0
    cc-by-2.5 cc-by-3.0 cc-by-4.0 cc-by-sa-3.0 cc-by-sa-4.0 cc-by-nc-2.0 cc-by-nc-3.0 cc-by-nc-4.0 cc-by-nd-4.0
    cc-by-nc-nd-3.0 cc-by-nc-nd-4.0 cc-by-nc-sa-2.0 cc-by-nc-sa-3.0 cc-by-nc-sa-4.0 cdla-sharing-1.0
    cdla-permissive-1.0 cdla-permissive-2.0 wtfpl ecl-2.0 epl-1.0 epl-2.0 etalab-2.0 eupl-1.1 eupl-1.2 agpl-3.0 gfdl
    gpl gpl-2.0 gpl-3.0 lgpl lgpl-2.1 lgpl-3.0 isc h-research intel-research lppl-1.3c ms-pl apple-ascl apple-amlr
    mpl-2.0 odc-by odbl openrail++ osl-3.0 postgresql ofl-1.1 ncsa unlicense zlib pddl lgpl-lr deepfloyd-if-license
    fair-noncommercial-research-license llama2 llama3 llama3.1 llama3.2 llama3.3 llama4 gemma unknown other
""".split())


def check_license(license: str | None) -> str | None:
    """`--license` as the hub takes it: one of its licence identifiers (lower case), else one line naming the fix."""
    if license is None:
        return None
    if license.strip().lower() not in HUB_LICENSES:
        shown = license if len(license) <= 40 else license[:40] + "..."
        raise ValueError(f"--license {shown!r} is not a Hugging Face Hub licence identifier (e.g. apache-2.0, mit, "
                         "cc-by-nc-4.0); for any other licence pass --license other and describe it in the card.")
    return license.strip().lower()
