"""ConvNextV2Backbone: transformers' backbone API and weights, fed by FCMAE or classifier checkpoints, under a
transformers dense-prediction head."""

import pytest
import torch
import transformers

from conftest import perturbed, tiny_config
from convnextv2_hf import (
    ConvNextV2Backbone,
    ConvNextV2Config,
    ConvNextV2ForImageClassification,
    ConvNextV2ForMaskedImageModeling,
)

STAGES = ["stem", "stage1", "stage2", "stage3", "stage4"]


def encoder_weights(model) -> dict[str, torch.Tensor]:
    """Stem and stage weights under backbone names (no `convnextv2.` prefix, no head, decoder or final norm)."""
    prefix = "convnextv2." if hasattr(model, "convnextv2") else ""
    return {k.removeprefix(prefix): v for k, v in model.state_dict().items()
            if k.removeprefix(prefix).startswith(("embeddings.", "encoder."))}


@pytest.mark.parametrize("source_class", [ConvNextV2ForMaskedImageModeling, ConvNextV2ForImageClassification])
def test_loads_every_encoder_weight_of_fcmae_and_classifier_checkpoints(tmp_path, source_class):
    source = perturbed(source_class(tiny_config()))
    source.save_pretrained(tmp_path)
    backbone, info = ConvNextV2Backbone.from_pretrained(tmp_path, out_features=["stage2", "stage4"],
                                                        output_loading_info=True)
    assert sorted(info["missing_keys"]) == sorted(f"hidden_states_norms.{s}.{p}" for s in ("stage2", "stage4")
                                                  for p in ("weight", "bias"))
    loaded = backbone.state_dict()
    for name, tensor in encoder_weights(source).items():
        assert torch.equal(loaded[name], tensor), name


@pytest.mark.parametrize("out_features", [["stage4"], ["stem", "stage2", "stage3"], STAGES])
def test_feature_maps_equal_transformers_backbone_on_the_same_weights(tmp_path, out_features):
    ours = perturbed(ConvNextV2Backbone(tiny_config(out_features=out_features)))
    ours.save_pretrained(tmp_path)
    theirs = transformers.ConvNextV2Backbone.from_pretrained(tmp_path).eval()
    assert type(theirs).__module__.startswith("transformers.")
    images = torch.randn(2, 3, 64, 48)
    with torch.no_grad():
        a, b = ours(images, output_hidden_states=True), theirs(images, output_hidden_states=True)
    assert ours.channels == theirs.channels and len(a.feature_maps) == len(out_features)
    for x, y in zip(a.feature_maps + a.hidden_states, b.feature_maps + b.hidden_states):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5)
    assert ours(images).hidden_states is None


def test_fcmae_backbone_trains_under_upernet(tmp_path):
    ConvNextV2ForMaskedImageModeling(ConvNextV2Config.from_preset("atto")).save_pretrained(tmp_path)
    backbone = ConvNextV2Backbone.from_pretrained(tmp_path, out_features=["stage1", "stage2", "stage3", "stage4"])
    config = transformers.UperNetConfig(backbone_config=backbone.config, num_labels=5, hidden_size=32,
                                        auxiliary_in_channels=backbone.channels[2])
    segmenter = transformers.UperNetForSemanticSegmentation(config)
    segmenter.backbone = backbone
    stem_before = backbone.embeddings.patch_embeddings.weight.detach().clone()
    images, labels = torch.randn(2, 3, 64, 64), torch.randint(0, 5, (2, 64, 64))
    output = segmenter(pixel_values=images, labels=labels)
    assert output.logits.shape == (2, 5, 64, 64) and torch.isfinite(output.loss)
    output.loss.backward()
    torch.optim.AdamW(segmenter.parameters(), lr=1e-3).step()
    assert not torch.equal(backbone.embeddings.patch_embeddings.weight, stem_before)
