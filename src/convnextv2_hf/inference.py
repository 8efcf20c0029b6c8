"""Fast inference for ConvNeXt V2 models: eval mode, channels-last weights, a fused CPU kernel, optional compile.

Library side: never copied into checkpoints. The fused kernel is a private oneDNN op, so it is swapped into a model
only when you ask for it here, in your own process.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def fused_linear_gelu_available() -> bool:
    try:
        return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    except (AttributeError, RuntimeError):
        return False


class LinearGELU(nn.Linear):
    """`gelu(linear(x))` with the exact (erf) GELU; eager fp32 CPU inference computes both in one oneDNN kernel.

    Profiling showed GELU at about 40 % of eager CPU inference time; the fused kernel is about 4x faster than the two
    ops with the same numbers. Training, other devices and dtypes, autocast and `torch.compile` (which fuses on its
    own), and `torch.jit.trace` / `torch.jit.script` (the oneDNN op cannot be traced) take the plain path. Parameter
    names are those of the `nn.Linear` it replaces.
    """

    use_fused = fused_linear_gelu_available()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (self.use_fused and not torch.is_grad_enabled() and not torch.compiler.is_compiling()
                and not torch.jit.is_tracing() and not torch.jit.is_scripting()
                and x.device.type == "cpu" and x.dtype == torch.float32 and self.weight.dtype == torch.float32
                and not torch.is_autocast_enabled("cpu")):
            return torch.ops.mkldnn._linear_pointwise(x.contiguous(), self.weight, self.bias, "gelu", [], "none")
        return F.gelu(super().forward(x))

    @classmethod
    def replacing(cls, linear: nn.Linear) -> "LinearGELU":
        fused = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta")
        fused.weight, fused.bias = linear.weight, linear.bias
        return fused


def fuse_linear_gelu(model: nn.Module) -> int:
    """Swap every ConvNeXt V2 block's `pwconv1` + exact GELU for a [`LinearGELU`]; returns how many were swapped."""
    swapped = 0
    for module in model.modules():
        pwconv1, act = getattr(module, "pwconv1", None), getattr(module, "act", None)
        exact_gelu = isinstance(act, nn.GELU) and act.approximate == "none" or type(act).__name__ == "GELUActivation"
        if isinstance(pwconv1, nn.Linear) and not isinstance(pwconv1, LinearGELU) and exact_gelu:
            module.pwconv1, module.act = LinearGELU.replacing(pwconv1), nn.Identity()
            swapped += 1
    return swapped


def optimize_for_inference(model: nn.Module, compile: bool = False, **compile_kwargs) -> nn.Module:
    """Prepare a ConvNeXt V2 model for fast inference: eval mode, channels-last weights, the fused Linear + GELU
    kernel on CPU, and (opt-in) `torch.compile`.

    Outputs are unchanged up to float rounding; `state_dict` keys are unchanged, so the model still saves and loads
    as before. Compilation takes a while on the first call and needs a C++ compiler on CPU.

    Example:

    ```python
    >>> import torch
    >>> from convnextv2_hf import ConvNextV2Config, ConvNextV2ForImageClassification
    >>> from convnextv2_hf.inference import optimize_for_inference
    >>> model = optimize_for_inference(ConvNextV2ForImageClassification(ConvNextV2Config.from_preset("atto")))
    >>> with torch.inference_mode():
    ...     logits = model(torch.randn(1, 3, 224, 224)).logits
    ```
    """
    model.eval()
    model.to(memory_format=torch.channels_last)
    fuse_linear_gelu(model)
    if compile:
        model.forward = torch.compile(model.forward, **compile_kwargs)
    return model


__all__ = ["LinearGELU", "fuse_linear_gelu", "optimize_for_inference"]
