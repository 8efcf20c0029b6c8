"""Exponential moving average of the weights during fine-tuning (the reference's `--model_ema`)."""

from __future__ import annotations

from transformers import TrainerCallback


class EMACallback(TrainerCallback):
    """Exponential moving average of the weights, updated after every optimizer step."""

    def __init__(self, model, decay: float):
        from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

        self.ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.ema.update_parameters(model)
