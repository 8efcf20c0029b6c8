import pytest
import torch
import transformers

from conftest import tiny_config
from convnextv2_hf import ConvNextV2ForImageClassification, ConvNextV2ForMaskedImageModeling
from convnextv2_hf.analysis import feature_collapse, mean_pairwise_cosine_distance
from convnextv2_hf.inference import optimize_for_inference


def test_cosine_distance_extremes():
    base = torch.rand(1, 4, 4, 1)
    assert mean_pairwise_cosine_distance(base.repeat(1, 1, 1, 8)).item() == pytest.approx(0.0, abs=1e-6)
    eye = torch.eye(4).view(1, 2, 2, 4)  # four orthogonal channels: off-diagonal distance 1/2, diagonal 0
    assert mean_pairwise_cosine_distance(eye).item() == pytest.approx(0.5 * 12 / 16)


def test_feature_collapse_on_ours_and_transformers():
    images = torch.randn(3, 3, 32, 32)
    ours = feature_collapse(ConvNextV2ForMaskedImageModeling(tiny_config()), images, batch_size=2)
    assert list(ours) == ["stage1.block1", "stage2.block1", "stage3.block1", "stage3.block2", "stage4.block1"]
    assert all(0.0 <= v <= 1.0 for v in ours.values())
    hf = transformers.ConvNextV2Model(transformers.ConvNextV2Config(depths=[1, 1, 2, 1], hidden_sizes=[8, 16, 24, 32]))
    assert len(feature_collapse(hf, images)) == 5
    with pytest.raises(ValueError, match="No ConvNeXt V2 blocks"):
        feature_collapse(torch.nn.Linear(2, 2), images)


def test_optimize_for_inference_keeps_logits():
    model = ConvNextV2ForImageClassification(tiny_config()).eval()
    images = torch.randn(2, 3, 40, 40)
    with torch.no_grad():
        before = model(images).logits
        after = optimize_for_inference(model)(images).logits
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-6)
    assert not model.training


def test_fused_linear_gelu_matches_the_plain_path():
    from convnextv2_hf.inference import LinearGELU, fuse_linear_gelu

    model = ConvNextV2ForImageClassification(tiny_config()).eval()
    images = torch.randn(2, 3, 40, 40)
    with torch.no_grad():
        before = model(images).logits
    keys = set(model.state_dict())
    assert fuse_linear_gelu(model) == 5  # one per block
    assert isinstance(model.convnextv2.encoder.stages[0].layers[0].pwconv1, LinearGELU)
    assert set(model.state_dict()) == keys  # same names: the model saves and loads as before
    with torch.no_grad():
        fused = model(images).logits  # the oneDNN kernel where available
    torch.testing.assert_close(fused, before, rtol=1e-5, atol=1e-6)
    model.train()
    loss = model(images).logits.sum()  # grad enabled: the plain path, and gradients reach the weights
    loss.backward()
    assert model.convnextv2.encoder.stages[0].layers[0].pwconv1.weight.grad is not None
