"""Fine-tuning script end to end, the pre-train -> fine-tune hand-off, and the recipe helpers."""

import json

import evaluate
import numpy as np
import pytest
import torch
import transformers
from PIL import Image

from conftest import (FINETUNE, FSDP_LAUNCH, FSDP_ON_CPU, TINY_OVERRIDES as TINY, launch_two_processes, make_image_folder,
                      tiny_config)
from convnextv2_hf import ConvNextV2ForImageClassification
from convnextv2_hf.training.finetune import main as finetune
from convnextv2_hf.training.data.mixup import MixupCutmixCollator
from convnextv2_hf.metrics import metric_path
from convnextv2_hf.training.loops.optim import layer_id, param_groups
from convnextv2_hf.training.pretrain import main as pretrain


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("labelled"), per_class=8)


def finetune_args(images, output_dir, *extra):
    return ["--train_dir", str(images), "--output_dir", str(output_dir), "--image_size", "32",
            "--per_device_train_batch_size", "4", "--learning_rate", "2e-3", "--num_train_epochs", "2",
            "--eval_strategy", "epoch", "--logging_steps", "1", "--report_to", "none", "--skip_corrupt_images",
            "--train_val_split", "0.25", "--seed", "0", "--save_strategy", "no", *extra]


def test_pretrain_then_finetune_then_pipeline(images, tmp_path, capfd):
    fcmae = tmp_path / "fcmae"
    pretrain(["--train_dir", str(images), "--output_dir", str(fcmae), "--config_overrides", TINY, "--image_size", "32",
              "--per_device_train_batch_size", "4", "--max_train_steps", "3", "--skip_corrupt_images"])
    out = tmp_path / "finetuned"
    metrics = finetune(finetune_args(images, out, "--model_name_or_path", str(fcmae), "--layer_decay", "0.8",
                                     "--label_smoothing_factor", "0.1", "--drop_path_rate", "0.1"))
    assert 0.0 <= metrics["eval_top1_accuracy"] <= 1.0
    # the FCMAE decoder left behind and the new head are expected: no transformers LOAD REPORT table for them
    assert "LOAD REPORT" not in capfd.readouterr().err
    assert "eval_top5_accuracy" not in metrics  # 2 classes: top-5 would always be 1
    card = (out / "README.md").read_text()
    assert "top_5_accuracy" not in card and f"`{images.name}`" in card  # named by its folder
    assert metrics["skipped_images"] == 1
    loaded = ConvNextV2ForImageClassification.from_pretrained(out)
    pretrained = transformers.AutoModelForMaskedImageModeling.from_pretrained(fcmae)
    assert loaded.config.id2label == {0: "cats", 1: "dogs"}
    # the encoder started from the FCMAE weights (and moved during fine-tuning)
    patch_weights = [m.convnextv2.embeddings.patch_embeddings.weight for m in (loaded, pretrained)]
    assert patch_weights[0].shape == patch_weights[1].shape
    for name in ("README.md", "preprocessor_config.json", "train_loss.png", "eval_accuracy.png", "all_results.json"):
        assert (out / name).exists(), name
    card = (out / "README.md").read_text()
    assert "model-index" in card and "Top-1 accuracy" in card
    # fine-tuned from an FCMAE folder, yet a plain transformers folder: no auto_map (it used to point at code the
    # folder does not hold) and no code files
    assert "auto_map" not in (out / "config.json").read_text() and not list(out.glob("*.py"))
    classifier = transformers.pipeline("image-classification", model=str(out))
    predictions = classifier(Image.new("RGB", (45, 60), (200, 0, 0)))
    assert {p["label"] for p in predictions} == {"cats", "dogs"}


def test_from_scratch_with_mixup_cutmix_and_ema(images, tmp_path):
    out = tmp_path / "scratch"
    metrics = finetune(finetune_args(images, out, "--config_overrides", TINY, "--mixup", "0.8", "--cutmix", "1.0",
                                     "--model_ema", "--model_ema_decay", "0.5", "--label_smoothing_factor", "0.1"))
    assert "eval_ema_top1_accuracy" in metrics and np.isfinite(metrics["train_loss"])
    assert (out / "ema" / "model.safetensors").exists()


def test_class_count_mismatch_fails_before_training(images, tmp_path):
    checkpoint = tmp_path / "three_classes"
    ConvNextV2ForImageClassification(tiny_config(num_labels=3)).save_pretrained(checkpoint)
    with pytest.raises(ValueError, match="classifies 3 classes but the dataset has 2"):
        finetune(finetune_args(images, tmp_path / "o1", "--model_name_or_path", str(checkpoint)))
    metrics = finetune(finetune_args(images, tmp_path / "o2", "--model_name_or_path", str(checkpoint),
                                     "--ignore_mismatched_sizes", "--num_train_epochs", "1"))
    assert "eval_top1_accuracy" in metrics

    other = tmp_path / "validation"
    make_image_folder(other, classes=("cats", "dogs", "fish"), per_class=2, corrupt=False)
    with pytest.raises(ValueError, match="Class mismatch"):
        finetune(finetune_args(images, tmp_path / "o3", "--validation_dir", str(other), "--config_overrides", TINY))


def test_unreadable_image_is_named_and_missing_label_column_is_clear(images, tmp_path):
    args = finetune_args(images, tmp_path / "o", "--config_overrides", TINY)
    args.remove("--skip_corrupt_images")
    with pytest.raises(ValueError, match="broken.png"):
        finetune(args)
    with pytest.raises(ValueError, match="--label_column_name 'species' not found"):
        finetune(finetune_args(images, tmp_path / "o4", "--label_column_name", "species"))


def test_push_to_hub_offline_fails_first(images, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(RuntimeError, match="HF_HUB_OFFLINE"):
        finetune(finetune_args(images, tmp_path / "o", "--push_to_hub", "--hub_model_id", "me/model"))


def test_layer_ids_follow_the_reference():
    depths = [3, 3, 9, 3]
    assert layer_id("convnextv2.embeddings.patch_embeddings.weight", depths) == 1
    assert layer_id("convnextv2.encoder.stages.2.downsampling_layer.1.weight", depths) == 7
    assert layer_id("convnextv2.encoder.stages.2.layers.4.pwconv1.weight", depths) == 11
    assert layer_id("classifier.weight", depths) == 19
    assert layer_id("convnextv2.embeddings.layernorm.weight", depths, "group") == 0
    assert layer_id("convnextv2.encoder.stages.2.layers.7.dwconv.weight", depths, "group") == 5
    assert layer_id("convnextv2.encoder.stages.3.downsampling_layer.0.weight", depths, "group") == 12
    assert layer_id("classifier.bias", depths, "group") == 13


def test_param_groups_decay_and_scales():
    model = ConvNextV2ForImageClassification(tiny_config())
    groups = param_groups(model, weight_decay=0.05, layer_decay=0.5, learning_rate=1.0)
    by_name = {name: g for g in groups for name in g["names"]}
    assert by_name["classifier.weight"]["lr"] == 1.0 and by_name["classifier.weight"]["weight_decay"] == 0.05
    assert by_name["convnextv2.encoder.stages.0.layers.0.grn.weight"]["weight_decay"] == 0.0
    assert by_name["convnextv2.encoder.stages.0.layers.0.pwconv1.bias"]["weight_decay"] == 0.0
    # 5 blocks: the stem gets 0.5 ** (5 + 1 - 1)
    assert by_name["convnextv2.embeddings.patch_embeddings.weight"]["lr"] == pytest.approx(0.5**5)
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))


def test_shipped_metric_module():
    metric = evaluate.load(metric_path("topk_accuracy"))
    scores = [[0.1, 0.5, 0.2, 0.0, 0.1, 0.05], [0.9, 0.0, 0.0, 0.0, 0.0, 0.1], [0.0, 0.1, 0.2, 0.3, 0.4, 0.5]]
    result = metric.compute(predictions=scores, references=[2, 0, 0])
    assert result == {"top1_accuracy": pytest.approx(1 / 3), "top5_accuracy": pytest.approx(2 / 3)}


def test_mixup_cutmix_collator_makes_soft_labels():
    examples = [{"pixel_values": torch.full((3, 8, 8), float(i)), "labels": i % 3} for i in range(4)]
    smooth = MixupCutmixCollator(3, label_smoothing=0.1)(examples)
    assert torch.allclose(smooth["labels"].sum(1), torch.ones(4))
    assert smooth["labels"][0, 0] == pytest.approx(0.9 + 0.1 / 3)
    np.random.seed(0)
    mixed = MixupCutmixCollator(3, mixup_alpha=0.8)(examples)
    assert torch.allclose(mixed["labels"].sum(1), torch.ones(4))
    assert not torch.equal(mixed["pixel_values"], torch.stack([e["pixel_values"] for e in examples]))
    cut = MixupCutmixCollator(3, cutmix_alpha=1.0)(examples)
    values = cut["pixel_values"][0].unique()
    assert set(values.tolist()) <= {0.0, 3.0}


def test_evaluation_sees_the_processor_not_the_training_augmentation(images, tmp_path):
    """With RandAugment and erasing on for training, evaluation images are exactly what the saved processor (and so
    a pipeline) makes of them."""
    from types import SimpleNamespace

    from convnextv2_hf import ConvNextV2ImageProcessor
    from convnextv2_hf.training.arguments import DataArguments, FinetuningArguments, ModelArguments
    from convnextv2_hf.training.data.decoding import decode_image
    from convnextv2_hf.training.data.folders import folder_dataset, scan_folder
    from convnextv2_hf.training.finetune import LabelledData, attach_transforms

    split = folder_dataset(scan_folder(images, "--train_dir"), labelled=True)
    split = split.filter(lambda row: not row["image"]["path"].endswith("broken.png"))
    data = LabelledData(split, split.select(range(len(split))), "image", "label", ["cats", "dogs"], 0, 0)
    processor = ConvNextV2ImageProcessor(size={"shortest_edge": 32})
    recipe = FinetuningArguments()
    assert recipe.aa != "none" and recipe.reprob > 0
    attach_transforms(data, processor, ModelArguments(image_size=32), recipe, DataArguments(),
                      SimpleNamespace(seed=0))
    for index in range(3):
        expected = processor(decode_image(split[index]["image"]), return_tensors="pt")["pixel_values"][0]
        assert torch.equal(data.evaluation[index]["pixel_values"], expected)


def test_two_processes_fine_tune_as_one_run_and_fsdp2_resumes_to_the_same_model(images, tmp_path):
    """Two CPU processes (`accelerate launch --multi_gpu`, no CUDA) fine-tune as one run over gloo: 12 training
    images at 2 per process make one epoch in 3 steps (two independent runs would fight over the output folder).
    FSDP2 on the same processes, with the recipe's layer-wise decay, resumed from its sharded step-2 checkpoint,
    ends with the same weights."""
    from safetensors.torch import load_file

    def args(out, *extra):
        return ["--train_dir", str(images), "--output_dir", str(out), "--config_overrides", TINY, "--image_size", "32",
                "--per_device_train_batch_size", "2", "--learning_rate", "2e-3", "--max_steps", "3", "--layer_decay",
                "0.8", "--eval_strategy", "no", "--save_strategy", "steps", "--save_steps", "2", "--report_to", "none",
                "--skip_corrupt_images", "--train_val_split", "0.25", "--seed", "0", *extra]

    script = FINETUNE[1]
    launch_two_processes(script, args(tmp_path / "ddp"))
    trained = json.loads((tmp_path / "ddp" / "log_history.json").read_text())[0]
    assert (trained["step"], trained["epoch"]) == (3, 1.0)
    sharded = tmp_path / "fsdp"
    launch_two_processes(FSDP_ON_CPU, [script, *args(sharded)], launch=FSDP_LAUNCH)
    assert {"pytorch_model_fsdp_0", "optimizer_0"} <= {p.name for p in (sharded / "checkpoint-2").iterdir()}
    launch_two_processes(FSDP_ON_CPU, [script, *args(sharded, "--resume_from_checkpoint", str(sharded / "checkpoint-2"))],
                         launch=FSDP_LAUNCH)
    whole, gathered = load_file(tmp_path / "ddp" / "model.safetensors"), load_file(sharded / "model.safetensors")
    assert whole.keys() == gathered.keys()
    for key in whole:
        torch.testing.assert_close(gathered[key], whole[key], rtol=1e-4, atol=1e-5)
