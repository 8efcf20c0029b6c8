"""Issue 20: tools nobody here wrote, run against folders this project writes, each from the user's side (a fresh
process, stdin closed; plain-transformers processes never import this package)."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from conftest import (CLI, REPO, TINY_OVERRIDES, assert_ok, make_image_folder, perturbed, run_as_user,
                      run_plain_python, tiny_config)
from convnextv2_hf import ConvNextV2Config, ConvNextV2ForImageClassification, ConvNextV2ForMaskedImageModeling
from convnextv2_hf import ConvNextV2ImageProcessor
from convnextv2_hf.convert_convnextv2 import export_checkpoint
from convnextv2_hf.outputs.staging import save_model_and_processor

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture(scope="module")
def fcmae_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("fcmae")
    config = tiny_config(image_size=32, norm_pix_loss=True)
    save_model_and_processor(ConvNextV2ForMaskedImageModeling(config),
                             ConvNextV2ImageProcessor(size={"shortest_edge": 32}, mask_cell_size=16), folder)
    return folder


def test_timm_small_sizes_convert_in_and_export_out(tmp_path):
    fixture = load_file(str(FIXTURES / "timm_convnextv2.safetensors"))
    state = {k.removeprefix("convmlp_clf.state."): v for k, v in fixture.items() if k.startswith("convmlp_clf.state.")}
    save_file(state, str(tmp_path / "timm.safetensors"))
    assert_ok(run_as_user([*CLI, "convert", "--from", "timm", "--checkpoint", str(tmp_path / "timm.safetensors"),
                           "--output_dir", str(tmp_path / "converted")], tmp_path))
    model = ConvNextV2ForImageClassification.from_pretrained(tmp_path / "converted").eval()
    with torch.no_grad():
        assert (model(fixture["convmlp_clf.input"]).logits - fixture["convmlp_clf.output"]).abs().max() <= 1e-4
    # an atto classifier exported to timm has exactly timm's convnextv2_atto names and shapes (head aside)
    atto = tmp_path / "atto"
    ConvNextV2ForImageClassification(ConvNextV2Config.from_preset("atto", num_labels=3)).save_pretrained(atto)
    assert_ok(run_as_user([*CLI, "export", "--to", "timm", "--model_name_or_path", str(atto), "--output",
                           str(tmp_path / "atto-timm.safetensors")], tmp_path))
    exported = {k: list(v.shape) for k, v in load_file(str(tmp_path / "atto-timm.safetensors")).items()}
    timm_atto = json.loads((FIXTURES / "timm_convnextv2_shapes.json").read_text())["atto.classifier"]
    assert exported.pop("head.fc.weight") == [3, 320] and timm_atto.pop("head.fc.weight") == [1000, 320]
    assert exported.pop("head.fc.bias") == [3] and timm_atto.pop("head.fc.bias") == [1000]
    assert exported == timm_atto


def test_pre_training_continues_a_converted_checkpoint_with_its_objective(tmp_path):
    model = perturbed(ConvNextV2ForMaskedImageModeling(tiny_config(norm_pix_loss=True, image_size=32)))
    export_checkpoint(model, "reference", tmp_path / "fcmae.pt")
    assert_ok(run_as_user([*CLI, "convert", "--from", "reference", "--checkpoint", str(tmp_path / "fcmae.pt"),
                           "--output_dir", str(tmp_path / "converted")], tmp_path))
    images = make_image_folder(tmp_path / "images", per_class=4, corrupt=False)
    out = tmp_path / "continued"
    assert_ok(run_as_user([sys.executable, str(REPO / "examples" / "pretraining" / "run_fcmae.py"), "--train_dir",
                           str(images), "--output_dir", str(out), "--model_name_or_path", str(tmp_path / "converted"),
                           "--image_size", "32", "--per_device_train_batch_size", "4", "--max_train_steps", "1"],
                          tmp_path))
    config = json.loads((out / "config.json").read_text())
    assert config["norm_pix_loss"] is True and config["image_size"] == 32


SIXTEEN_BIT_PLAIN = """
from PIL import Image
from transformers import AutoImageProcessor
processor = AutoImageProcessor.from_pretrained(FOLDER)
pixels = processor(Image.open(IMAGE), return_tensors="np")["pixel_values"][0]
print(float(pixels[0].max() - pixels[0].min()), float(pixels[0, 0, 0]))
"""


def test_sixteen_bit_images_rescaled_by_ours_saturated_by_plain_transformers(fcmae_folder, tmp_path):
    """What the README says about 16-bit images: our processor (and so our training) rescales them to 8 bits;
    plain transformers' `convert("RGB")` clips every value above 255 to white. Serve such images through our
    processor, or convert them to 8 bits first."""
    classifier = tmp_path / "classifier"
    save_model_and_processor(ConvNextV2ForImageClassification(tiny_config(image_size=32)),
                             ConvNextV2ImageProcessor(size={"shortest_edge": 32}), classifier)
    ramp = np.tile(np.linspace(0, 65535, 40, dtype=np.uint16), (40, 1))
    image = tmp_path / "ramp16.png"
    Image.fromarray(ramp).save(image)
    assert Image.open(image).mode.startswith("I;16")
    code = SIXTEEN_BIT_PLAIN.replace("FOLDER", repr(str(classifier))).replace("IMAGE", repr(str(image)))
    spread, corner = map(float, run_plain_python(code, tmp_path).split())
    ours = ConvNextV2ImageProcessor.from_pretrained(classifier)(Image.open(image), return_tensors="np")
    ours = ours["pixel_values"][0]
    assert float(ours[0].max() - ours[0].min()) > 3.5  # black to white: the whole normalised range
    assert spread < 0.2  # plain transformers: (nearly) all white
    assert corner > ours[0, 0, 0]


RUN_MIM_STEPS = """
import sys
from transformers import AutoConfig, AutoModelForMaskedImageModeling
folder = sys.argv[1]
config = AutoConfig.from_pretrained(folder)
print("encoder_stride", config.encoder_stride, config.image_size, config.patch_size)
try:
    AutoModelForMaskedImageModeling.from_pretrained(folder, config=config)
except ValueError as error:
    print("refused:", " ".join(str(error).split()))
"""


def test_run_mim_without_remote_code_learns_it_at_load_time(fcmae_folder, tmp_path):
    """What transformers' run_mim.py does before training: read the config's strides, then load the model."""
    out = run_plain_python(RUN_MIM_STEPS.replace("sys.argv[1]", repr(str(fcmae_folder))), tmp_path)
    assert "encoder_stride 16 32 2" in out
    assert "refused:" in out and "trust_remote_code=True" in out


CLASSIFIER_VIA_REMOTE_CODE = """
import json, os, sys
from transformers import AutoConfig, AutoModelForImageClassification
fcmae, out = sys.argv[1:3]
config = AutoConfig.from_pretrained(fcmae, trust_remote_code=True, num_labels=3)
AutoModelForImageClassification.from_pretrained(fcmae, config=config, trust_remote_code=True).save_pretrained(out)
saved = json.load(open(os.path.join(out, "config.json")))
reloaded = AutoModelForImageClassification.from_pretrained(out)
print("auto_map" in saved, type(reloaded).__module__)
"""


def test_a_classifier_saved_through_remote_code_points_at_no_missing_code(fcmae_folder, tmp_path):
    code = CLASSIFIER_VIA_REMOTE_CODE.replace("sys.argv[1:3]", repr([str(fcmae_folder), str(tmp_path / "clf")]))
    out = run_plain_python(code, tmp_path)
    assert out.split()[-2:] == ["False", "transformers.models.convnextv2.modeling_convnextv2"]


TRACE = """
import torch
from convnextv2_hf import ConvNextV2Config, ConvNextV2ForImageClassification
from convnextv2_hf.inference import optimize_for_inference
model = optimize_for_inference(ConvNextV2ForImageClassification(ConvNextV2Config.from_preset("atto", num_labels=3)))
images = torch.randn(2, 3, 64, 64)
with torch.no_grad():
    traced = torch.jit.trace(model, images, strict=False)
    print(float((traced(images)["logits"] - model(images).logits).abs().max()))
"""


def test_jit_trace_after_optimize_for_inference(tmp_path):
    result = run_as_user([sys.executable, "-c", TRACE], tmp_path)
    assert_ok(result)
    assert float(result.stdout.split()[-1]) <= 1e-5


EVALUATOR = """
import sys, evaluate
from datasets import load_dataset
from transformers import pipeline
from convnextv2_hf.metrics import metric_path
folder, images = sys.argv[1:3]
data = load_dataset("imagefolder", data_dir=images, split="train")
classify = pipeline("image-classification", model=folder)
evaluator = evaluate.evaluator("image-classification")
# evaluator.compute() itself, step by step: evaluate 0.4.6 fails in prepare_pipeline under transformers 5 (it asks
# for transformers.TFPreTrainedModel, which is gone) whatever the metric, so the steps after it are run directly.
metric_inputs, pipe_inputs = evaluator.prepare_data(data=data, input_column="image", label_column="label")
predictions, _ = evaluator.call_pipeline(classify, pipe_inputs)
metric_inputs.update(evaluator.predictions_processor(predictions, classify.model.config.label2id))
result = evaluator.compute_metric(metric=evaluate.load(metric_path("topk_accuracy")), metric_inputs=metric_inputs)
print(sorted(k for k in result if "accuracy" in k), result["top1_accuracy"])
"""


def test_the_shipped_metric_works_with_evaluates_evaluator(tmp_path):
    images = make_image_folder(tmp_path / "images", per_class=3, corrupt=False)
    config = tiny_config(image_size=32, num_labels=2, id2label={0: "cats", 1: "dogs"}, label2id={"cats": 0, "dogs": 1})
    save_model_and_processor(ConvNextV2ForImageClassification(config),
                             ConvNextV2ImageProcessor(size={"shortest_edge": 32}), tmp_path / "clf")
    code = EVALUATOR.replace("sys.argv[1:3]", repr([str(tmp_path / "clf"), str(images)]))
    out = assert_ok(run_as_user([sys.executable, "-c", code], tmp_path)).strip().splitlines()
    line = next(line for line in out if line.startswith("["))
    assert line.startswith("['top1_accuracy']") and 0.0 <= float(line.split()[-1]) <= 1.0


def test_fsdp_asked_for_but_not_running_is_said(tmp_path):
    images = make_image_folder(tmp_path / "images", per_class=4, corrupt=False)
    result = run_as_user([sys.executable, str(REPO / "examples" / "pretraining" / "run_fcmae.py"), "--train_dir",
                          str(images), "--output_dir", str(tmp_path / "out"), "--config_overrides", TINY_OVERRIDES,
                          "--image_size", "32", "--per_device_train_batch_size", "4", "--max_train_steps", "1"],
                         tmp_path, ACCELERATE_USE_FSDP="true")
    said = [line for line in assert_ok(result).splitlines() if "asks for FSDP" in line]
    assert len(said) == 1 and "one process without distribution" in said[0]


def test_a_multi_cpu_accelerate_config_run_as_one_process_is_said(tmp_path):
    """`accelerate config` chose MULTI_CPU with 2 processes; `accelerate launch` runs it as one process (mpirun is
    what would start more): the run says so in one warning and names the launch that gives two."""
    home = tmp_path / "hf"
    (home / "accelerate").mkdir(parents=True)
    (home / "accelerate" / "default_config.yaml").write_text(
        "compute_environment: LOCAL_MACHINE\ndistributed_type: MULTI_CPU\nnum_processes: 2\nnum_machines: 1\n"
        "machine_rank: 0\nmixed_precision: 'no'\nuse_cpu: true\n")
    images = make_image_folder(tmp_path / "images", per_class=4, corrupt=False)
    result = run_as_user([sys.executable, "-m", "accelerate.commands.launch", str(REPO / "examples" / "pretraining" /
                          "run_fcmae.py"), "--train_dir", str(images), "--output_dir", str(tmp_path / "out"),
                          "--config_overrides", TINY_OVERRIDES, "--image_size", "32", "--per_device_train_batch_size",
                          "4", "--max_train_steps", "1"], tmp_path, HF_HOME=str(home))
    said = [line for line in assert_ok(result).splitlines() if "MULTI_CPU" in line]
    assert len(said) == 1 and "--multi_gpu --num_processes 2" in said[0], result.stderr[-2000:]


@pytest.mark.slow
def test_fsdp_launched_on_cpu_processes_is_said_once(tmp_path):
    """`accelerate launch --use_fsdp` of 2 CPU processes runs DDP; the main process says so, the other does not."""
    from conftest import FSDP_LAUNCH, launch_two_processes

    images = make_image_folder(tmp_path / "images", per_class=4, corrupt=False)
    result = launch_two_processes(REPO / "examples" / "pretraining" / "run_fcmae.py", [
        "--train_dir", str(images), "--output_dir", str(tmp_path / "out"), "--config_overrides", TINY_OVERRIDES,
        "--image_size", "32", "--per_device_train_batch_size", "2", "--max_train_steps", "1"], launch=FSDP_LAUNCH)
    said = [line for line in (result.stdout + result.stderr).splitlines() if "asks for FSDP" in line]
    assert len(said) == 1 and "on 2 process(es)" in said[0], said


def test_cards_name_the_data_and_report_top_k_only_below_the_class_count(tmp_path):
    from huggingface_hub import ModelCard

    train = make_image_folder(tmp_path / "flowers" / "train", per_class=6, corrupt=False)
    out = tmp_path / "out"
    assert_ok(run_as_user([sys.executable, str(REPO / "examples" / "classification" / "run_finetune.py"),
                           "--train_dir", str(train), "--output_dir", str(out), "--config_overrides", TINY_OVERRIDES,
                           "--image_size", "32", "--per_device_train_batch_size", "4", "--max_steps", "1",
                           "--eval_strategy", "no", "--save_strategy", "no", "--report_to", "none",
                           "--train_val_split", "0.25"], tmp_path))
    card = ModelCard.load(out / "README.md")
    assert "`flowers`" in card.text and "Top-5" not in card.content and "top_5" not in card.content
    assert card.data.eval_results[0].dataset_name == "flowers"
