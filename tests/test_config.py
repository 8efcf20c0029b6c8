import pytest
import torch

from convnextv2_hf import CONVNEXTV2_PRESETS, ConvNextV2Config, ConvNextV2ForImageClassification

# SPEC section 1: parameters (millions) with a 1000-class head.
EXPECTED_PARAMS_M = {
    "atto": 3.7, "femto": 5.2, "pico": 9.1, "nano": 15.6, "tiny": 28.6, "base": 89, "large": 198, "huge": 660,
}


@pytest.mark.parametrize("name", sorted(EXPECTED_PARAMS_M))
def test_preset_parameter_counts(name):
    config = ConvNextV2Config.from_preset(name, num_labels=1000)
    with torch.device("meta"):
        model = ConvNextV2ForImageClassification(config)
    params_m = sum(p.numel() for p in model.parameters()) / 1e6
    assert abs(params_m - EXPECTED_PARAMS_M[name]) / EXPECTED_PARAMS_M[name] < 0.02, params_m


def test_presets_cover_the_spec_family():
    assert set(CONVNEXTV2_PRESETS) == set(EXPECTED_PARAMS_M)
    with pytest.raises(ValueError, match="Unknown preset"):
        ConvNextV2Config.from_preset("gigantic")


@pytest.mark.parametrize("ratio", [0.0, 1.0, -0.1, 1.5])
def test_mask_ratio_outside_open_interval_is_rejected(ratio):
    with pytest.raises(ValueError, match="mask_ratio"):
        ConvNextV2Config(mask_ratio=ratio)


def test_other_invalid_fields_are_rejected():
    with pytest.raises(ValueError, match="sparse_grn_scope"):
        ConvNextV2Config(sparse_grn_scope="global")
    with pytest.raises(ValueError, match="num_stages"):
        ConvNextV2Config(depths=[1, 1, 1], hidden_sizes=[8, 16, 32, 64])


def test_mask_cell_follows_the_stem():
    assert ConvNextV2Config().mask_cell_size == 32
    assert ConvNextV2Config(patch_size=2).mask_cell_size == 16
    assert ConvNextV2Config(patch_size=1, num_stages=3, depths=[1, 1, 1], hidden_sizes=[8, 16, 32]).mask_cell_size == 4


def test_round_trip_keeps_fcmae_fields(tmp_path):
    config = ConvNextV2Config.from_preset("atto", mask_ratio=0.75, decoder_depth=2, norm_pix_loss=True)
    config.save_pretrained(tmp_path)
    loaded = ConvNextV2Config.from_pretrained(tmp_path)
    assert loaded.model_type == "convnextv2"
    assert (loaded.mask_ratio, loaded.decoder_depth, loaded.norm_pix_loss) == (0.75, 2, True)
    assert loaded.depths == [2, 2, 6, 2]
