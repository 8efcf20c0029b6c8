"""Feature-collapse analysis from the ConvNeXt V2 paper (section 3.2): are the expanded MLP channels redundant?"""

from __future__ import annotations

import re

import torch


def mean_pairwise_cosine_distance(features: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Per image, `1/C^2 * sum_ij (1 - cos(X_i, X_j)) / 2` over the channels of `features` (N, H, W, C).

    Near 0 means the channels are (anti-)copies of each other (collapse); larger means more diverse channels.
    """
    flat = features.flatten(1, 2).float()  # (N, HW, C)
    unit = flat / flat.norm(dim=1, keepdim=True).clamp_min(eps)
    cosine = unit.transpose(1, 2) @ unit  # (N, C, C)
    return ((1 - cosine) / 2).mean(dim=(1, 2))


def expanded_feature_modules(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """The second pointwise layer of every encoder block: its input is the 4C-wide (post-GRN) hidden feature."""
    pattern = re.compile(r"encoder\.stages\.\d+\.layers\.\d+\.pwconv2$")
    return [(name, module) for name, module in model.named_modules() if pattern.search(name)]


@torch.no_grad()
def feature_collapse(model: torch.nn.Module, pixel_values: torch.Tensor, batch_size: int = 64) -> dict[str, float]:
    """Mean pairwise cosine distance of the expanded hidden features, per block, averaged over `pixel_values`.

    Works on any ConvNeXt V2 model with transformers' module names (this package's classifier, backbone or FCMAE
    model, and transformers' own); the encoder runs densely on whole images.

    Example:

    ```python
    >>> import torch
    >>> from convnextv2_hf import ConvNextV2Config, ConvNextV2ForImageClassification
    >>> from convnextv2_hf.analysis import feature_collapse
    >>> model = ConvNextV2ForImageClassification(ConvNextV2Config.from_preset("atto"))
    >>> scores = feature_collapse(model, torch.randn(4, 3, 64, 64))
    >>> len(scores)
    12
    ```
    """
    modules = expanded_feature_modules(model)
    if not modules:
        raise ValueError("No ConvNeXt V2 blocks (encoder.stages.*.layers.*.pwconv2) found in this model.")
    base = getattr(model, getattr(model, "base_model_prefix", ""), model)
    sums = {name: 0.0 for name, _ in modules}

    def add_distance(name: str, inputs: tuple) -> None:
        sums[name] += mean_pairwise_cosine_distance(inputs[0]).sum().item()

    hooks = [module.register_forward_pre_hook(lambda _m, inputs, name=name: add_distance(name, inputs))
             for name, module in modules]
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(pixel_values), batch_size):
            base(pixel_values[start : start + batch_size])
    finally:
        for hook in hooks:
            hook.remove()
        model.train(was_training)
    short = {name: re.search(r"stages\.(\d+)\.layers\.(\d+)", name).groups() for name, _ in modules}
    return {f"stage{int(s) + 1}.block{int(b) + 1}": sums[name] / len(pixel_values) for name, (s, b) in short.items()}
