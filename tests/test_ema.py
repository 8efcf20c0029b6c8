"""The fine-tuning EMA (`--model_ema`): the reference's average, updated without waiting for the device, and able to
read the EMA weights of checkpoints written by release 0.2.0."""

import pytest
import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from conftest import tiny_config
from convnextv2_hf import ConvNextV2ForImageClassification
from convnextv2_hf.training.loops.ema import ModelEMA
from test_gpu_readiness import SyncCounter


class WithCounter(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.net = ConvNextV2ForImageClassification(tiny_config(num_labels=3))
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))


def moved(model, generator):
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator))
        model.steps += 1


def test_the_average_is_the_references_from_the_first_step():
    """timm's `ModelEma` (the reference's): ema = decay * ema + (1 - decay) * weight, starting from the model as
    it was when copied; integer buffers follow the model."""
    generator = torch.Generator().manual_seed(0)
    model, decay = WithCounter(), 0.75
    ema = ModelEMA(model, decay)
    expected = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    for _ in range(4):
        moved(model, generator)
        ema.update(model)
        for name, tensor in model.state_dict().items():
            expected[name] = expected[name] * decay + (1 - decay) * tensor if tensor.is_floating_point() else tensor
    got = ema.module.state_dict()
    assert got["steps"].item() == 4
    for name, tensor in expected.items():
        torch.testing.assert_close(got[name], tensor, rtol=1e-6, atol=1e-6, msg=name)
    assert not ema.module.training and not any(p.requires_grad for p in ema.module.parameters())


def test_an_update_never_waits_for_the_device():
    model = ConvNextV2ForImageClassification(tiny_config(num_labels=3))
    ema = ModelEMA(model, 0.9999)
    with SyncCounter() as counter:
        ema.update(model)
    assert counter.seen == []
    averaged = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.9999), use_buffers=True)
    with SyncCounter() as counter:  # the counter sees what torch's AveragedModel reads back on every update
        averaged.update_parameters(model)
    assert counter.seen


def test_ema_weights_of_release_0_2_0_checkpoints_load():
    model = ConvNextV2ForImageClassification(tiny_config(num_labels=3))
    old = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.5), use_buffers=True)
    with torch.no_grad():
        next(old.parameters()).add_(1.0)
    ema = ModelEMA(model, 0.5)
    ema.load_state_dict(old.state_dict())  # keys "module.*" and the counter "n_averaged"
    assert torch.equal(next(ema.module.parameters()), next(old.parameters()))


def test_a_decay_outside_zero_one_is_refused():
    with pytest.raises(ValueError, match="--model_ema_decay 1.5 is outside"):
        ModelEMA(torch.nn.Linear(2, 2), 1.5)


def test_updates_follow_a_move_of_both_models():
    """The tensor pairs are found once per model; moving (here: to float64, as the Trainer's move to a GPU) must
    not leave the average updating tensors that are no longer the model's."""
    model = torch.nn.Linear(3, 2)
    ema = ModelEMA(model, 0.5)
    ema.update(model)
    model.to(torch.float64)
    ema.to(torch.float64)
    with torch.no_grad():
        model.weight.fill_(2.0)
    before = ema.module.weight.clone()
    ema.update(model)
    assert ema.module.weight.dtype == torch.float64
    torch.testing.assert_close(ema.module.weight, 0.5 * before + 1.0)
