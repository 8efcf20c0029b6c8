"""Checkpoints cross between this package and plain `transformers`, the Auto classes and pipelines."""

import json

import numpy as np
import torch
import transformers
from PIL import Image

import pytest

from conftest import (
    TINY_OVERRIDES,
    assert_served_like_ours,
    make_image_folder,
    perturbed,
    run_as_user,
    run_plain_python,
    tiny_config,
    with_active_grn,
    write_photo,
)
from convnextv2_hf import (
    ConvNextV2Config,
    ConvNextV2ForImageClassification,
    ConvNextV2ForMaskedImageModeling,
    ConvNextV2ImageProcessor,
)
from convnextv2_hf.cli import main as cli
from convnextv2_hf.convert_convnextv2 import export_checkpoint
from convnextv2_hf.training.finetune import main as finetune
from test_sparse_backends import FAST_BACKENDS, assert_backends_agree


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


@pytest.mark.parametrize("widths", [[8, 16, 24, 32], [8, 8, 8, 8], [16, 8, 8, 24]])
def test_every_transformers_config_loads_into_ours(tmp_path, widths):
    # transformers downsamples at every later stage, also where the width does not change
    hf_config = transformers.ConvNextV2Config(depths=[1, 1, 2, 1], hidden_sizes=widths, patch_size=2, num_labels=4)
    theirs = perturbed(transformers.ConvNextV2ForImageClassification(hf_config))
    theirs.save_pretrained(tmp_path)
    ours, info = ConvNextV2ForImageClassification.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in theirs.parameters())
    images = torch.randn(2, 3, 40, 40)
    with torch.no_grad():
        assert (ours.eval()(images).logits - theirs(images).logits).abs().max() <= 1e-5
        hidden_ours = ours(images, output_hidden_states=True).hidden_states
        hidden_theirs = theirs(images, output_hidden_states=True).hidden_states
    assert [h.shape for h in hidden_ours] == [h.shape for h in hidden_theirs]
    fcmae = with_active_grn(ConvNextV2ForMaskedImageModeling.from_pretrained(tmp_path)).eval()
    mask = torch.tensor([[True, False, False, True], [False, True, True, True]])
    for backend in FAST_BACKENDS:
        assert_backends_agree(fcmae, torch.randn(2, 3, 32, 32), mask, backend)


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


# --------------------------------------------------------------------------------------------- native classifier folders


def write_with_save_pretrained(folder):
    labels = {0: "cat", 1: "dog", 2: "fish"}
    model = perturbed(ConvNextV2ForImageClassification(tiny_config(id2label=labels, label2id={v: k for k, v in labels.items()})))
    model.save_pretrained(folder)
    ConvNextV2ImageProcessor(size={"shortest_edge": 64}).save_pretrained(folder)


def write_with_run_finetune(folder):
    images = make_image_folder(folder.parent / "finetune-images", per_class=4, corrupt=False)
    finetune(["--train_dir", str(images), "--output_dir", str(folder), "--config_overrides", TINY_OVERRIDES,
              "--image_size", "64", "--per_device_train_batch_size", "4", "--num_train_epochs", "1",
              "--report_to", "none", "--save_strategy", "no", "--train_val_split", "0.25"])


def write_with_convert(folder):
    fcmae = folder.parent / "reference-fcmae.pt"
    export_checkpoint(perturbed(ConvNextV2ForMaskedImageModeling(tiny_config())), "reference", fcmae)
    assert 0 == cli(["convert", "--from", "reference", "--checkpoint", str(fcmae), "--output_dir", str(folder),
         "--task", "classification"])


WRITERS = {"save_pretrained": write_with_save_pretrained, "run_finetune": write_with_run_finetune,
           "convert": write_with_convert}


@pytest.fixture(scope="module")
def classifier_folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("writers")
    for name, write in WRITERS.items():
        write(root / name)
    return root


@pytest.mark.parametrize("environment", ["without torchvision", "with torchvision"])
@pytest.mark.parametrize("writer", sorted(WRITERS))
def test_classifier_folders_are_served_natively_like_ours(classifier_folders, tmp_path, writer, environment):
    folder = classifier_folders / writer
    assert "auto_map" not in json.loads((folder / "config.json").read_text())
    assert "auto_map" not in json.loads((folder / "preprocessor_config.json").read_text())
    assert not list(folder.glob("*.py"))
    processor = json.loads((folder / "preprocessor_config.json").read_text())
    assert processor["size"]["shortest_edge"] in (64, 224)
    image = write_photo(tmp_path / "photo.jpg")  # odd size, EXIF-rotated
    plain = assert_served_like_ours(folder, image, tmp_path, environment)
    expected = "ConvNextImageProcessorPil" if environment == "without torchvision" else "ConvNextImageProcessor"
    assert plain["classes"][0].endswith("." + expected)


def test_no_loading_path_reaches_the_remote_code_prompt(classifier_folders, tmp_path):
    fcmae = tmp_path / "fcmae"
    ConvNextV2ForMaskedImageModeling(tiny_config()).save_pretrained(fcmae)
    ConvNextV2ImageProcessor(size={"shortest_edge": 32}, mask_cell_size=16).save_pretrained(fcmae)
    image = write_photo(tmp_path / "photo.jpg")
    code = f"""
import convnextv2_hf, transformers
from transformers import pipeline
for folder in {[str(classifier_folders / w) for w in sorted(WRITERS)]!r}:
    print(pipeline("image-classification", model=folder)({str(image)!r})[0]["label"])
    transformers.AutoImageProcessor.from_pretrained(folder)
    transformers.AutoModelForImageClassification.from_pretrained(folder)
transformers.AutoConfig.from_pretrained({str(fcmae)!r})
transformers.AutoImageProcessor.from_pretrained({str(fcmae)!r})
transformers.AutoModelForMaskedImageModeling.from_pretrained({str(fcmae)!r})
transformers.AutoModelForImageClassification.from_pretrained({str(fcmae)!r})
print("done")
"""
    import sys

    result = run_as_user([sys.executable, "-c", code], tmp_path, timeout=300)  # stdin closed: a prompt would fail
    assert result.returncode == 0, result.stderr[-3000:]
    assert "done" in result.stdout
    assert "Do you wish to run the custom code" not in result.stdout + result.stderr


def test_importing_us_leaves_transformers_own_classes_quiet(tmp_path):
    import sys

    from conftest import run_as_user

    code = """
import convnextv2_hf, torch, transformers
config = transformers.ConvNextV2Config(depths=[1, 1, 1, 1], hidden_sizes=[8, 16, 24, 32])
print(transformers.ConvNextV2ForImageClassification(config)(torch.randn(1, 3, 32, 32)).logits.shape)
"""
    result = run_as_user([sys.executable, "-c", code], tmp_path, TRANSFORMERS_VERBOSITY="warning")
    assert result.returncode == 0 and "[ERROR]" not in result.stdout + result.stderr, result.stdout + result.stderr


def test_cli_respects_a_chosen_transformers_verbosity(monkeypatch):
    from transformers.utils import logging as hf_logging

    from convnextv2_hf.cli import quiet_transformers

    previous = hf_logging.get_verbosity()
    try:
        hf_logging.set_verbosity_info()
        monkeypatch.setenv("TRANSFORMERS_VERBOSITY", "info")
        quiet_transformers()
        assert hf_logging.get_verbosity() == hf_logging.INFO
        monkeypatch.delenv("TRANSFORMERS_VERBOSITY")
        quiet_transformers()
        assert hf_logging.get_verbosity() == hf_logging.ERROR
    finally:
        hf_logging.set_verbosity(previous)
