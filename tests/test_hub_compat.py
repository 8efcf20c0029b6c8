"""Checkpoints cross between this package and plain `transformers`, the Auto classes and pipelines."""

import json

import numpy as np
import torch
import transformers
from PIL import Image

from conftest import perturbed, run_plain_python, tiny_config
from convnextv2_hf import (
    ConvNextV2Config,
    ConvNextV2ForImageClassification,
    ConvNextV2ForMaskedImageModeling,
    ConvNextV2ImageProcessor,
)


def test_checkpoints_load_in_plain_transformers(tmp_path):
    images = torch.randn(2, 3, 32, 48)
    classifier = perturbed(ConvNextV2ForImageClassification(tiny_config()))
    classifier.save_pretrained(tmp_path / "clf")
    with torch.no_grad():
        torch.save({"images": images, "logits": classifier(images).logits}, tmp_path / "expected.pt")
    ConvNextV2ForMaskedImageModeling(tiny_config()).save_pretrained(tmp_path / "fcmae")
    run_plain_python(
        f"""
        import torch, transformers
        expected = torch.load({str(tmp_path / 'expected.pt')!r})
        model = transformers.AutoModelForImageClassification.from_pretrained({str(tmp_path / 'clf')!r})
        assert type(model).__module__.startswith("transformers."), type(model)
        with torch.no_grad():
            logits = model(expected["images"]).logits
        diff = (logits - expected["logits"]).abs().max().item()
        assert diff <= 1e-5, diff

        model, info = transformers.ConvNextV2ForImageClassification.from_pretrained(
            {str(tmp_path / 'fcmae')!r}, output_loading_info=True
        )
        missing = sorted(info["missing_keys"])
        assert missing == ["classifier.bias", "classifier.weight", "convnextv2.layernorm.bias",
                           "convnextv2.layernorm.weight"], missing
        assert all(k.startswith("decoder.") for k in info["unexpected_keys"]), info["unexpected_keys"]
        """,
        tmp_path,
    )


def test_transformers_checkpoint_loads_into_ours(tmp_path):
    hf_config = transformers.ConvNextV2Config(
        depths=[1, 1, 2, 1], hidden_sizes=[8, 16, 24, 32], patch_size=2, num_labels=4
    )
    theirs = perturbed(transformers.ConvNextV2ForImageClassification(hf_config))
    theirs.save_pretrained(tmp_path)
    ours, info = ConvNextV2ForImageClassification.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    images = torch.randn(2, 3, 40, 40)
    with torch.no_grad():
        assert (ours.eval()(images).logits - theirs(images).logits).abs().max() <= 1e-5
        hidden_ours = ours(images, output_hidden_states=True).hidden_states
        hidden_theirs = theirs(images, output_hidden_states=True).hidden_states
    assert len(hidden_ours) == len(hidden_theirs)


def test_import_registers_auto_classes(tmp_path):
    config = tiny_config()
    assert isinstance(transformers.AutoModelForMaskedImageModeling.from_config(config), ConvNextV2ForMaskedImageModeling)
    assert isinstance(transformers.AutoModelForImageClassification.from_config(config), ConvNextV2ForImageClassification)
    ConvNextV2ForMaskedImageModeling(config).save_pretrained(tmp_path)
    ConvNextV2ImageProcessor(size={"shortest_edge": 32}).save_pretrained(tmp_path)
    assert isinstance(transformers.AutoConfig.from_pretrained(tmp_path), ConvNextV2Config)
    assert isinstance(transformers.AutoModelForMaskedImageModeling.from_pretrained(tmp_path), ConvNextV2ForMaskedImageModeling)
    assert isinstance(transformers.AutoImageProcessor.from_pretrained(tmp_path), ConvNextV2ImageProcessor)


def test_remote_code_works_without_the_package(tmp_path):
    model = perturbed(ConvNextV2ForMaskedImageModeling(tiny_config()))
    model.save_pretrained(tmp_path / "ckpt")
    ConvNextV2ImageProcessor(size={"shortest_edge": 32}, mask_cell_size=16).save_pretrained(tmp_path / "ckpt")
    images = torch.randn(2, 3, 32, 32)
    mask = torch.tensor([[True, False, True, False], [False, False, True, True]])
    with torch.no_grad():
        loss = model(images, bool_masked_pos=mask).loss
    torch.save({"images": images, "mask": mask, "loss": loss}, tmp_path / "expected.pt")
    run_plain_python(
        f"""
        import torch, transformers
        from PIL import Image
        ckpt = {str(tmp_path / 'ckpt')!r}
        expected = torch.load({str(tmp_path / 'expected.pt')!r})
        model = transformers.AutoModelForMaskedImageModeling.from_pretrained(ckpt, trust_remote_code=True)
        assert type(model).__name__ == "ConvNextV2ForMaskedImageModeling", type(model)
        with torch.no_grad():
            loss = model(expected["images"], bool_masked_pos=expected["mask"]).loss
        assert abs(loss.item() - expected["loss"].item()) <= 1e-6, (loss, expected["loss"])
        processor = transformers.AutoImageProcessor.from_pretrained(ckpt, trust_remote_code=True)
        batch = processor(Image.new("RGB", (40, 50)), return_bool_masked_pos=True, return_tensors="pt")
        assert batch["bool_masked_pos"].shape == (1, 4), batch["bool_masked_pos"].shape
        """,
        tmp_path,
    )


def test_pipeline_returns_labels_from_id2label(tmp_path):
    labels = {0: "cat", 1: "dog", 2: "fish"}
    config = tiny_config(id2label=labels, label2id={v: k for k, v in labels.items()})
    ConvNextV2ForImageClassification(config).save_pretrained(tmp_path)
    ConvNextV2ImageProcessor(size={"shortest_edge": 32}).save_pretrained(tmp_path)
    classifier = transformers.pipeline("image-classification", model=str(tmp_path))
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (50, 40, 3), dtype=np.uint8))
    predictions = classifier(image, top_k=3)
    assert sorted(p["label"] for p in predictions) == ["cat", "dog", "fish"]
    assert abs(sum(p["score"] for p in predictions) - 1.0) < 1e-4
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "convnextv2"
