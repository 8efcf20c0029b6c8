"""Gradient checkpointing recomputes every block in backward and changes no number: loss and every gradient."""

import json

import pytest
import torch

from conftest import TINY_OVERRIDES, make_image_folder, tiny_config, with_active_grn
from convnextv2_hf import (
    ConvNextV2Backbone,
    ConvNextV2ForImageClassification,
    ConvNextV2ForMaskedImageModeling,
    ConvNextV2Model,
)
from convnextv2_hf.sparse_backends import minkowski_engine_available
from convnextv2_hf.training.finetune import main as finetune
from convnextv2_hf.training.pretrain import main as pretrain

IMAGES = torch.randn(3, 3, 32, 48)
MASK = torch.tensor([[1, 0, 1, 0, 0, 1], [0, 1, 1, 1, 0, 0], [1, 1, 0, 0, 1, 0]], dtype=torch.bool)


def classifier_loss(model):
    return model(IMAGES, labels=torch.tensor([0, 1, 2])).loss


def base_model_loss(model):
    return model(IMAGES).pooler_output.square().mean()


def backbone_loss(model):
    return sum(m.square().mean() for m in model(IMAGES).feature_maps)


def fcmae_loss(model):
    return model(IMAGES, bool_masked_pos=MASK).loss


CASES = {
    "classifier": (ConvNextV2ForImageClassification, {}, classifier_loss),
    "base model": (ConvNextV2Model, {}, base_model_loss),
    "backbone": (ConvNextV2Backbone, {"out_features": ["stage2", "stage4"]}, backbone_loss),
    "fcmae-dense": (ConvNextV2ForMaskedImageModeling, {"sparse_backend": "dense"}, fcmae_loss),
    "fcmae-gather": (ConvNextV2ForMaskedImageModeling, {"sparse_backend": "gather"}, fcmae_loss),
    "mixmae-gather": (ConvNextV2ForMaskedImageModeling, {"sparse_backend": "gather", "mask_strategy": "mixmae"},
                      fcmae_loss),
}


def loss_and_gradients(model, loss_fn):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(7)  # same drop-path draws in both runs
    loss = loss_fn(model)
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("case", sorted(CASES))
def test_same_loss_and_gradients_with_blocks_recomputed(case):
    model_class, extra, loss_fn = CASES[case]
    model = with_active_grn(model_class(tiny_config(drop_path_rate=0.3, decoder_depth=2, **extra))).train()
    assert model.supports_gradient_checkpointing
    loss, grads = loss_and_gradients(model, loss_fn)

    calls = []
    model.base_model.encoder.stages[1].layers[0].pwconv1.register_forward_hook(lambda *_: calls.append(1))
    model.gradient_checkpointing_enable()
    checkpointed_loss, checkpointed_grads = loss_and_gradients(model, loss_fn)
    assert len(calls) == 2, "the block should run again in backward"
    torch.testing.assert_close(checkpointed_loss, loss, rtol=1e-4, atol=1e-6)
    assert checkpointed_grads.keys() == grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(checkpointed_grads[name], grad, rtol=1e-4, atol=1e-6, msg=lambda m: f"{name}: {m}")

    model.gradient_checkpointing_disable()
    calls.clear()
    loss_and_gradients(model, loss_fn)
    assert len(calls) == 1


@pytest.mark.skipif(not minkowski_engine_available(), reason="MinkowskiEngine is not built here (CI builds it)")
def test_minkowski_backend_says_it_does_not_checkpoint():
    model = ConvNextV2ForMaskedImageModeling(tiny_config(sparse_backend="minkowski")).train()
    model.gradient_checkpointing_enable()
    with pytest.raises(ValueError, match="not supported with sparse_backend='minkowski'.*gather"):
        fcmae_loss(model)


def test_both_scripts_take_the_flag(tmp_path):
    images = make_image_folder(tmp_path / "images", per_class=4, corrupt=False)
    common = ["--train_dir", str(images), "--config_overrides", TINY_OVERRIDES, "--image_size", "32",
              "--per_device_train_batch_size", "4", "--max_train_steps", "2", "--learning_rate", "1e-3",
              "--num_warmup_steps", "0", "--sparse_grn_scope", "sample", "--seed", "1"]
    plain = pretrain(common + ["--output_dir", str(tmp_path / "plain")])
    checkpointed = pretrain(common + ["--output_dir", str(tmp_path / "checkpointed"), "--gradient_checkpointing"])
    for (_, a), (_, b) in zip(plain["history"], checkpointed["history"]):
        assert a == pytest.approx(b, rel=1e-5)
    metrics = finetune(["--train_dir", str(images), "--output_dir", str(tmp_path / "ft"), "--config_overrides",
                        TINY_OVERRIDES, "--image_size", "32", "--per_device_train_batch_size", "4",
                        "--max_steps", "2", "--report_to", "none", "--save_strategy", "no", "--gradient_checkpointing"])
    assert "eval_top1_accuracy" in metrics
    assert "auto_map" not in json.loads((tmp_path / "ft" / "config.json").read_text())
