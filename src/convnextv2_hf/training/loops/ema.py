"""The fine-tuning `--model_ema`: an exponential moving average of the weights, as the reference keeps it.

The reference (`main_finetune.py`, timm's `ModelEma`) copies the model once at the start and after every optimizer
step moves each weight and buffer of the copy towards the model's: `ema = decay * ema + (1 - decay) * weight`. Here
that is one fused `torch._foreach_lerp_` over all floating-point tensors per step, on the model's device, with no
value read back to the host (torch's `AveragedModel` tests a device counter in Python on every update, which waits
for the GPU, and copies instead of averaging on its first update).
"""

from __future__ import annotations

import copy

import torch


class ModelEMA(torch.nn.Module):
    """An averaged copy of `model` in `self.module` (evaluation mode, no gradients).

    Example:
        >>> import torch
        >>> model = torch.nn.Linear(2, 2)
        >>> ema = ModelEMA(model, decay=0.9)
        >>> with torch.no_grad():
        ...     _ = model.weight.add_(1.0)
        >>> ema.update(model)
        >>> torch.allclose(ema.module.weight, model.weight - 0.9)
        True
    """

    def __init__(self, model: torch.nn.Module, decay: float):
        super().__init__()
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"--model_ema_decay {decay} is outside [0, 1]; the reference uses 0.9999.")
        self.module = copy.deepcopy(unwrapped(model)).eval().requires_grad_(False)
        self.decay = decay
        self._pairs: dict[int, tuple] = {}  # id(model) -> its tensors beside ours, found once (a walk costs ms)

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        """One step towards `model`'s current weights and buffers (integer buffers are copied)."""
        model = unwrapped(model)
        if id(model) not in self._pairs:
            self._pairs = {id(model): split_by_kind(*paired_tensors(self.module, model))}
        (averaged, current), (counters, their_counters) = self._pairs[id(model)]
        if averaged:
            torch._foreach_lerp_(averaged, current, 1.0 - self.decay)
        for mine, theirs in zip(counters, their_counters):
            mine.copy_(theirs)

    def _apply(self, *args, **kwargs):
        self._pairs = {}  # moved: find the tensors again
        return super()._apply(*args, **kwargs)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """Also reads the `ema.safetensors` of release 0.2.0 and before (torch's `AveragedModel`, with a counter)."""
        state_dict = {key: value for key, value in state_dict.items() if key != "n_averaged"}
        return super().load_state_dict(state_dict, strict=strict, assign=assign)


def unwrapped(model: torch.nn.Module) -> torch.nn.Module:
    """The module itself under `torch.compile`'s and DDP's wrappers (Accelerate's own unwrapping)."""
    from accelerate.utils import extract_model_from_parallel

    return extract_model_from_parallel(model, keep_torch_compile=False)


def paired_tensors(averaged: torch.nn.Module, model: torch.nn.Module) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The averaged copy's parameters and buffers beside the model's, in the same order."""
    mine = [*averaged.parameters(), *averaged.buffers()]
    theirs = [*model.parameters(), *model.buffers()]
    if len(mine) != len(theirs):
        raise ValueError(f"The EMA copy holds {len(mine)} tensors but the model {len(theirs)}; the model changed its "
                         "structure after --model_ema copied it.")
    return mine, theirs


def split_by_kind(mine: list, theirs: list) -> tuple[tuple[list, list], tuple[list, list]]:
    """(floating-point pairs, averaged; other pairs, copied)."""
    floating = [tensor.is_floating_point() for tensor in mine]
    return ((list(_pick(mine, floating, True)), list(_pick(theirs, floating, True))),
            (list(_pick(mine, floating, False)), list(_pick(theirs, floating, False))))


def _pick(tensors: list, floating: list, kind: bool):
    return (tensor for tensor, is_float in zip(tensors, floating) if is_float is kind)
