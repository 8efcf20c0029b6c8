import argparse
import json
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file

from conftest import perturbed, tiny_config
from convnextv2_hf import ConvNextV2ForImageClassification, ConvNextV2ForMaskedImageModeling
from convnextv2_hf.cli import main as cli
from convnextv2_hf.convert_convnextv2 import (
    convert_checkpoint,
    dense_conv_to_sparse,
    dense_dwconv_to_sparse,
    export_checkpoint,
    from_our_layout,
    load_state_dict,
    sparse_conv_to_dense,
    sparse_dwconv_to_dense,
    to_our_layout,
)

FIXTURE = Path(__file__).parent / "fixtures" / "timm_convnextv2.safetensors"


def randomized(model):
    return perturbed(model, std=0.2)


def test_sparse_kernel_layout_follows_spec_elementwise():
    k, channels = 7, 3
    kernel = torch.randn(k * k, channels)  # asymmetric: its transpose differs
    dense = sparse_dwconv_to_dense(kernel)
    assert dense.shape == (channels, 1, k, k)
    assert not torch.equal(dense, dense.transpose(2, 3))
    for c in range(channels):
        for y in range(k):
            for x in range(k):
                assert dense[c, 0, y, x] == kernel[x * k + y, c]
    torch.testing.assert_close(dense_dwconv_to_sparse(dense), kernel, rtol=0, atol=0)

    conv = torch.randn(4, 5, 6)  # (k*k, C_in, C_out) with k = 2
    dense_conv = sparse_conv_to_dense(conv)
    assert dense_conv.shape == (6, 5, 2, 2)
    for o in range(6):
        for i in range(5):
            for y in range(2):
                for x in range(2):
                    assert dense_conv[o, i, y, x] == conv[x * 2 + y, i, o]
    torch.testing.assert_close(dense_conv_to_sparse(dense_conv), conv, rtol=0, atol=0)


def test_reference_classifier_round_trips_both_ways(tmp_path):
    model = randomized(ConvNextV2ForImageClassification(tiny_config()))
    reference = export_checkpoint(model, "reference", tmp_path / "ref.pth")
    assert reference["stages.2.1.grn.gamma"].shape == (1, 1, 1, 96)
    assert reference["downsample_layers.0.1.weight"].shape == (8,)  # stem LayerNorm
    assert reference["downsample_layers.1.1.weight"].shape == (16, 8, 2, 2)  # downsampling conv
    assert "head.weight" in reference and "norm.weight" in reference
    back = convert_checkpoint(tmp_path / "ref.pth", "reference")
    images = torch.randn(2, 3, 32, 48)
    with torch.no_grad():
        torch.testing.assert_close(back(images).logits, model(images).logits, rtol=0, atol=1e-6)
    # and reference -> ours -> reference reproduces every tensor
    again = from_our_layout(to_our_layout(reference, "reference"), "reference")
    assert again.keys() == reference.keys()
    assert all(torch.equal(again[k], reference[k]) for k in reference)


def test_reference_fcmae_round_trip_preserves_loss(tmp_path):
    config = tiny_config(decoder_depth=2)
    model = randomized(ConvNextV2ForMaskedImageModeling(config))
    reference = export_checkpoint(model, "reference", tmp_path / "fcmae.pt")
    assert reference["encoder.stages.0.0.dwconv.kernel"].shape == (49, 8)
    assert reference["encoder.stages.0.0.dwconv.bias"].shape == (1, 8)
    assert reference["encoder.downsample_layers.1.1.kernel"].shape == (4, 8, 16)
    assert reference["encoder.downsample_layers.1.1.bias"].shape == (1, 16)
    assert reference["encoder.downsample_layers.1.0.ln.weight"].shape == (8,)
    assert reference["encoder.stages.1.0.pwconv1.linear.weight"].shape == (64, 16)
    assert reference["encoder.stages.1.0.grn.gamma"].shape == (1, 64)
    assert reference["decoder.1.grn.gamma"].shape == (1, 1, 1, 64)
    assert reference["mask_token"].shape == (1, 16, 1, 1)
    assert reference["pred.weight"].shape == (16 * 16 * 3, 16, 1, 1)

    converted = convert_checkpoint(tmp_path / "fcmae.pt", "reference", output_dir=tmp_path / "out")
    assert isinstance(converted, ConvNextV2ForMaskedImageModeling)
    assert converted.config.decoder_depth == 2 and converted.config.depths == [1, 1, 2, 1]
    images = torch.randn(2, 3, 32, 48)
    mask = torch.tensor([[1, 0, 1, 0, 0, 1], [0, 1, 1, 0, 1, 0]], dtype=torch.bool)
    with torch.no_grad():
        expected = model(images, bool_masked_pos=mask).loss
        reloaded = ConvNextV2ForMaskedImageModeling.from_pretrained(tmp_path / "out")
        assert torch.equal(reloaded(images, bool_masked_pos=mask).loss, converted(images, bool_masked_pos=mask).loss)
        torch.testing.assert_close(converted(images, bool_masked_pos=mask).loss, expected, rtol=0, atol=1e-6)
    again = from_our_layout(to_our_layout(reference, "reference_fcmae"), "reference_fcmae")
    assert all(torch.equal(again[k], reference[k]) for k in reference)

    classifier = convert_checkpoint(tmp_path / "fcmae.pt", "reference", task="classification")
    assert isinstance(classifier, ConvNextV2ForImageClassification)
    torch.testing.assert_close(
        classifier.convnextv2.encoder.stages[2].layers[1].dwconv.weight,
        model.convnextv2.encoder.stages[2].layers[1].dwconv.weight,
    )


def _timm_fixture(prefix):
    tensors = load_file(str(FIXTURE))
    state = {k.removeprefix(f"{prefix}.state."): v for k, v in tensors.items() if k.startswith(f"{prefix}.state.")}
    return state, tensors[f"{prefix}.input"], tensors[f"{prefix}.output"]


def test_timm_classifier_matches_timms_own_outputs(tmp_path):
    state, images, timm_logits = _timm_fixture("clf")
    from safetensors.torch import save_file

    save_file(state, str(tmp_path / "timm.safetensors"))
    model = convert_checkpoint(tmp_path / "timm.safetensors", "timm").eval()
    with torch.no_grad():
        assert (model(images).logits - timm_logits).abs().max() <= 1e-4
    exported = export_checkpoint(model, "timm", tmp_path / "back.safetensors")
    assert exported.keys() == state.keys()
    assert all(torch.equal(exported[k], state[k]) for k in state)


def test_converted_fcmae_keeps_the_objective_it_was_trained_with(tmp_path):
    """norm_pix_loss, image size and eps survive export -> convert (same loss on the same batch and mask); a
    reference checkpoint's own `args` are read; one that records nothing gets the reference default (True)."""
    model = randomized(ConvNextV2ForMaskedImageModeling(tiny_config(norm_pix_loss=True, image_size=64,
                                                                    layer_norm_eps=1e-6)))
    export_checkpoint(model, "reference", tmp_path / "fcmae.pt")
    assert torch.load(tmp_path / "fcmae.pt", weights_only=True)["args"]["norm_pix_loss"] is True
    converted = convert_checkpoint(tmp_path / "fcmae.pt", "reference", output_dir=tmp_path / "out")
    saved = json.loads((tmp_path / "out" / "config.json").read_text())
    assert (saved["norm_pix_loss"], saved["image_size"], saved["layer_norm_eps"]) == (True, 64, 1e-6)
    images = torch.randn(2, 3, 32, 48)
    mask = torch.tensor([[1, 0, 1, 0, 0, 1], [0, 1, 1, 0, 1, 0]], dtype=torch.bool)
    with torch.no_grad():
        torch.testing.assert_close(converted(images, bool_masked_pos=mask).loss,
                                   model(images, bool_masked_pos=mask).loss, rtol=0, atol=1e-6)
    weights = torch.load(tmp_path / "fcmae.pt", weights_only=True)["model"]
    torch.save({"model": weights}, tmp_path / "bare.pt")
    assert convert_checkpoint(tmp_path / "bare.pt", "reference").config.norm_pix_loss is True
    their_args = argparse.Namespace(input_size=192, norm_pix_loss=False, mask_ratio=0.75, model="convnextv2_atto")
    torch.save({"model": weights, "args": their_args, "epoch": 799}, tmp_path / "theirs.pt")
    config = convert_checkpoint(tmp_path / "theirs.pt", "reference").config
    assert (config.norm_pix_loss, config.image_size, config.mask_ratio) == (False, 192, 0.75)


def test_timm_conv_mlp_models_match_timms_own_outputs_both_ways(tmp_path):
    """timm's atto to nano keep MLP weights as 1x1 convolutions; both directions match timm's own numbers."""
    from safetensors.torch import save_file

    state, images, timm_logits = _timm_fixture("convmlp_clf")
    assert state["stages.0.blocks.0.mlp.fc1.weight"].dim() == 4
    save_file(state, str(tmp_path / "timm.safetensors"))
    model = convert_checkpoint(tmp_path / "timm.safetensors", "timm").eval()
    with torch.no_grad():
        assert (model(images).logits - timm_logits).abs().max() <= 1e-4
    exported = export_checkpoint(model, "timm", tmp_path / "back.safetensors", timm_conv_mlp=True)
    assert exported.keys() == state.keys() and all(torch.equal(exported[k], state[k]) for k in state)
    encoder, images, timm_features = _timm_fixture("convmlp_fcmae")
    torch.save(encoder, tmp_path / "timm_fcmae.pth")
    with torch.no_grad():
        features = convert_checkpoint(tmp_path / "timm_fcmae.pth", "timm").eval().convnextv2(images).last_hidden_state
    assert (features - timm_features).abs().max() <= 1e-4


@pytest.mark.parametrize("size", ["atto", "femto", "pico", "nano", "tiny", "base", "large", "huge"])
def test_timm_layout_of_every_size_equals_timms_names_and_shapes(size):
    """Exported classifier and encoder-only weights have exactly the names and shapes timm's `convnextv2_<size>`
    has (recorded from timm by the fixture script), and convert back to ours unchanged."""
    from convnextv2_hf import ConvNextV2Config
    from convnextv2_hf.convert_convnextv2 import timm_uses_conv_mlp

    timm_shapes = json.loads(FIXTURE.with_name("timm_convnextv2_shapes.json").read_text())
    for kind, num_labels in (("classifier", 1000), ("encoder", 0)):
        config = ConvNextV2Config.from_preset(size, num_labels=num_labels)
        with torch.device("meta"):
            ours = ConvNextV2ForImageClassification(config).state_dict()
        layout = "timm_conv_mlp" if timm_uses_conv_mlp(config) else "timm"
        assert (layout == "timm_conv_mlp") == (size in ("atto", "femto", "pico", "nano"))
        theirs = from_our_layout(ours, layout)
        assert {k: list(v.shape) for k, v in theirs.items()} == timm_shapes[f"{size}.{kind}"]
        back = to_our_layout(theirs, "timm")
        assert {k: v.shape for k, v in back.items()} == {k: v.shape for k, v in ours.items()}


def test_timm_fcmae_encoder_weights_match_timms_features(tmp_path):
    state, images, timm_features = _timm_fixture("fcmae")
    torch.save(state, tmp_path / "timm_fcmae.pth")
    model = convert_checkpoint(tmp_path / "timm_fcmae.pth", "timm").eval()
    with torch.no_grad():
        features = model.convnextv2(images).last_hidden_state
    assert (features - timm_features).abs().max() <= 1e-4


def test_transformers_source_and_layout_mismatch(tmp_path):
    hf = transformers.ConvNextV2ForImageClassification(
        transformers.ConvNextV2Config(depths=[1, 1, 2, 1], hidden_sizes=[8, 16, 24, 32], patch_size=2, num_labels=4)
    )
    hf.save_pretrained(tmp_path)
    model = convert_checkpoint(tmp_path, "transformers")
    assert model.config.num_labels == 4
    with pytest.raises(ValueError, match="looks like a transformers checkpoint"):
        convert_checkpoint(tmp_path, "timm")


class NotATensor:
    pass


def test_loading_never_runs_pickled_code(tmp_path):
    state = ConvNextV2ForImageClassification(tiny_config()).state_dict()
    torch.save({"model": from_our_layout(state, "reference"), "payload": NotATensor()}, tmp_path / "evil.pth")
    with pytest.raises(ValueError, match="refuses"):
        load_state_dict(tmp_path / "evil.pth")
    # the reference's own checkpoints carry argparse arguments: that inert container is allowed
    torch.save({"model": from_our_layout(state, "reference"), "args": argparse.Namespace(lr=1.0)}, tmp_path / "ok.pth")
    assert "head.weight" in load_state_dict(tmp_path / "ok.pth")


def test_unknown_missing_and_misshapen_keys_are_named(tmp_path):
    reference = from_our_layout(ConvNextV2ForImageClassification(tiny_config()).state_dict(), "reference")
    torch.save({**reference, "stages.0.0.gamma": torch.zeros(8)}, tmp_path / "extra.pth")
    with pytest.raises(KeyError, match="stages.0.0.gamma"):
        convert_checkpoint(tmp_path / "extra.pth", "reference")
    missing = dict(reference)
    del missing["stages.1.0.pwconv2.bias"]
    torch.save(missing, tmp_path / "missing.pth")
    with pytest.raises(KeyError, match="pwconv2.bias"):
        convert_checkpoint(tmp_path / "missing.pth", "reference")
    bad = dict(reference)
    bad["stages.1.0.pwconv1.weight"] = torch.zeros(64, 15)
    torch.save(bad, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="stages.1.layers.0.pwconv1.weight"):
        convert_checkpoint(tmp_path / "bad.pth", "reference")


def test_command_line_convert_and_export(tmp_path, capsys):
    model = randomized(ConvNextV2ForImageClassification(tiny_config()))
    export_checkpoint(model, "reference", tmp_path / "ref.pth")
    (tmp_path / "labels.json").write_text(json.dumps(["cat", "dog", "fish"]))
    assert 0 == cli(["convert", "--from", "reference", "--checkpoint", str(tmp_path / "ref.pth"),
         "--output_dir", str(tmp_path / "hf"), "--id2label", str(tmp_path / "labels.json")])
    loaded = ConvNextV2ForImageClassification.from_pretrained(tmp_path / "hf")
    assert loaded.config.id2label == {0: "cat", 1: "dog", 2: "fish"}
    assert (tmp_path / "hf" / "preprocessor_config.json").exists()
    images = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(images).logits, model(images).logits, rtol=0, atol=1e-6)
    assert 0 == cli(["export", "--to", "reference", "--model_name_or_path", str(tmp_path / "hf"), "--output",
                     str(tmp_path / "x.pth")])
    assert "wrote" in capsys.readouterr().out
    back = load_state_dict(tmp_path / "x.pth")
    reference = load_state_dict(tmp_path / "ref.pth")
    assert all(torch.equal(back[k], reference[k]) for k in reference)


def test_push_to_hub_fails_clearly_offline(tmp_path, capsys):
    assert 2 == cli(["convert", "--from", "reference", "--checkpoint", str(tmp_path / "none.pth"), "--output_dir",
                     str(tmp_path / "o"), "--push_to_hub", "--hub_model_id", "me/model"])
    assert "HF_HUB_OFFLINE" in capsys.readouterr().err


def test_converting_over_our_earlier_model_replaces_only_what_we_wrote(tmp_path):
    model = randomized(ConvNextV2ForImageClassification(tiny_config()))
    export_checkpoint(model, "reference", tmp_path / "ref.pth")
    export_checkpoint(randomized(ConvNextV2ForMaskedImageModeling(tiny_config())), "reference", tmp_path / "fcmae.pth")
    out = tmp_path / "hf"
    assert cli(["convert", "--from", "reference", "--checkpoint", str(tmp_path / "fcmae.pth"), "--output_dir",
                str(out)]) == 0
    (out / "notes.txt").write_text("the user's notes")
    assert list(out.glob("*.py"))
    assert cli(["convert", "--from", "reference", "--checkpoint", str(tmp_path / "ref.pth"), "--output_dir",
                str(out)]) == 2  # it holds a model: --overwrite_output_dir needed
    assert cli(["convert", "--from", "reference", "--checkpoint", str(tmp_path / "ref.pth"), "--output_dir", str(out),
                "--overwrite_output_dir"]) == 0
    assert not list(out.glob("*.py"))  # the FCMAE code our earlier conversion wrote went with it
    assert json.loads((out / "config.json").read_text())["architectures"] == ["ConvNextV2ForImageClassification"]
    assert (out / "notes.txt").read_text() == "the user's notes"


def test_a_model_we_did_not_write_is_never_replaced(tmp_path, capsys):
    export_checkpoint(randomized(ConvNextV2ForImageClassification(tiny_config())), "reference", tmp_path / "ref.pth")
    out = tmp_path / "hf"
    ConvNextV2ForMaskedImageModeling(tiny_config()).save_pretrained(out)
    (out / "README.md").write_text("card of the model that was here")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert cli(["convert", "--from", "reference", "--checkpoint", str(tmp_path / "ref.pth"), "--output_dir", str(out),
                "--overwrite_output_dir"]) == 2
    assert "not written by convnextv2-hf" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
