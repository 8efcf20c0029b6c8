"""Issue 21's silently-wrong and obscure cases, each run as a user types it (a fresh process, stdin closed): every
one gets the documented behaviour, or one line on stderr naming the input and the fix, with exit code 2."""

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from conftest import (CLI, FINETUNE, PRETRAIN, TINY_OVERRIDES, assert_ok, assert_one_line, make_image_folder,
                      run_as_user, tiny_config)
from convnextv2_hf import ConvNextV2ForImageClassification, ConvNextV2ForMaskedImageModeling, ConvNextV2ImageProcessor
from convnextv2_hf.outputs.staging import save_model_and_processor

SMALL = ["--image_size", "32", "--per_device_train_batch_size", "4", "--seed", "0"]


def pretrain_cmd(train: Path, out: Path, *extra: str) -> list[str]:
    return [*PRETRAIN, "--train_dir", str(train), "--output_dir", str(out), "--config_overrides", TINY_OVERRIDES,
            *SMALL, "--learning_rate", "1e-3", "--num_warmup_steps", "0", "--max_train_steps", "1", *extra]


def finetune_cmd(train: Path, out: Path, *extra: str, overrides: str = TINY_OVERRIDES) -> list[str]:
    start = [] if "--model_name_or_path" in extra else ["--config_overrides", overrides]
    return [*FINETUNE, "--train_dir", str(train), "--output_dir", str(out), *start, *SMALL, "--max_steps", "1",
            "--learning_rate", "1e-3", "--eval_strategy", "no", "--save_strategy", "no", "--report_to", "none",
            "--disable_tqdm", "true", "--train_val_split", "0.25", *extra]


def config_of(folder: Path) -> dict:
    return json.loads((folder / "config.json").read_text())


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("data") / "images", per_class=6, corrupt=False)


@pytest.fixture(scope="module")
def fcmae_folder(tmp_path_factory) -> Path:
    """A tiny FCMAE checkpoint as our pre-training writes it."""
    folder = tmp_path_factory.mktemp("fcmae")
    torch.manual_seed(0)
    config = tiny_config(image_size=32, norm_pix_loss=True)
    save_model_and_processor(ConvNextV2ForMaskedImageModeling(config), ConvNextV2ImageProcessor(
        size={"shortest_edge": 32}, mask_cell_size=config.mask_cell_size), folder)
    return folder


def classifier_folder(folder: Path, labels: list[str]) -> Path:
    """A tiny trained-looking classifier of `labels` (random weights, distinct head rows)."""
    torch.manual_seed(1)
    config = tiny_config(image_size=32, num_labels=len(labels), id2label=dict(enumerate(labels)),
                         label2id={name: i for i, name in enumerate(labels)})
    model = ConvNextV2ForImageClassification(config)
    with torch.no_grad():
        model.classifier.weight.normal_(0, 1.0)
        model.classifier.bias.normal_(0, 1.0)
    save_model_and_processor(model, ConvNextV2ImageProcessor(size={"shortest_edge": 32}), folder)
    return folder


def damaged_copy(source: Path, target: Path, damage) -> Path:
    """A copy of a model folder whose weights `damage(state_dict)` changed (or whose file it rewrote)."""
    target.mkdir(parents=True)
    for path in source.iterdir():
        if path.is_file():
            (target / path.name).write_bytes(path.read_bytes())
    weights = target / "model.safetensors"
    state = load_file(str(weights))
    changed = damage(state, weights)
    if changed is not None:
        save_file(changed, str(weights))
    return target


def without_a_weight(state, _):
    return {k: v for k, v in state.items() if ".stages.2." not in k}


def with_nan(state, _):
    key = next(k for k in state if k.endswith("dwconv.weight"))
    return state | {key: torch.full_like(state[key], float("nan"))}


def with_integers(state, _):
    key = next(k for k in state if k.endswith("dwconv.weight"))
    return state | {key: state[key].round().to(torch.int32)}


def truncated(_, weights: Path):
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])


# --------------------------------------------------------------------------------------------- flags and overrides


@pytest.mark.parametrize("flags, words", [
    (["--num_train_epochs", "0", "--max_steps", "-1"], ["--num_train_epochs"]),
    (["--max_steps", "0"], ["--max_steps"]),
    (["--weight_decay", "-1"], ["--weight_decay"]),
    (["--label_smoothing_factor", "1.5"], ["--label_smoothing_factor"]),
    (["--gradient_accumulation_steps", "0"], ["--gradient_accumulation_steps"]),
    (["--per_device_eval_batch_size", "0"], ["--per_device_eval_batch_size"]),
    (["--report_to", "wandb"], ["--report_to wandb", "pip install wandb"]),
    (["--config_overrides", "depths=[1,1,'a',1]"], ["depths", "positive integers"]),
    (["--config_overrides", "depths=[1,1"], ["depths"]),
    (["--config_overrides", "image_size="], ["image_size"]),
    (["--config_overrides", "use_grn=maybe"], ["use_grn", "true or false"]),
    (["--config_overrides", "drop_path_rate=0.2", "--drop_path_rate", "0.1"], ["--drop_path_rate", "disagree"]),
], ids=lambda value: "_".join(value) if isinstance(value, list) else None)
def test_finetuning_flags_are_checked_before_any_work(flags, words, images, tmp_path):
    if "wandb" in flags and importlib.util.find_spec("wandb"):
        pytest.skip("wandb is installed here: the refusal needs an environment without it")
    out = tmp_path / "out"
    result = run_as_user(finetune_cmd(images, out, *flags), tmp_path)
    assert_one_line(result, *words)
    assert not (out / "model.safetensors").exists()


@pytest.mark.parametrize("flags, words", [
    (["--no_norm_pix_loss", "--config_overrides", TINY_OVERRIDES + ",norm_pix_loss=true"], ["norm_pix_loss", "disagree"]),
    (["--with_tracking", "--report_to", "wandb"], ["--report_to wandb"]),
    (["--config_overrides", "norm_pix_loss=1"], ["norm_pix_loss", "true or false"]),
], ids=["flag_and_override_disagree", "tracker_not_installed", "override_not_a_boolean"])
def test_pretraining_flags_are_checked_before_any_work(flags, words, images, tmp_path):
    if "wandb" in flags and importlib.util.find_spec("wandb"):
        pytest.skip("wandb is installed here: the refusal needs an environment without it")
    result = run_as_user(pretrain_cmd(images, tmp_path / "out", *flags), tmp_path)
    assert_one_line(result, *words)


def test_an_override_is_not_replaced_by_the_flags_default(images, tmp_path):
    pre = tmp_path / "pre"
    assert_ok(run_as_user(pretrain_cmd(images, pre, "--config_overrides", TINY_OVERRIDES + ",norm_pix_loss=false"),
                          tmp_path))
    assert config_of(pre)["norm_pix_loss"] is False
    fine = tmp_path / "fine"
    assert_ok(run_as_user(finetune_cmd(images, fine, overrides=TINY_OVERRIDES + ",drop_path_rate=0.2"), tmp_path))
    assert config_of(fine)["drop_path_rate"] == 0.2
    assert "**drop path**: 0.2" in (fine / "README.md").read_text()


def test_a_non_finite_loss_stops_fine_tuning_without_saving_a_model(images, tmp_path):
    out = tmp_path / "out"
    result = run_as_user(finetune_cmd(images, out, "--learning_rate", "1e30", "--max_steps", "4"), tmp_path)
    assert_one_line(result, "The loss became", "lower the learning rate")
    assert not (out / "model.safetensors").exists()


# --------------------------------------------------------------------------------------------- start folders


@pytest.mark.parametrize("damage, words", [
    (without_a_weight, ["lacks", "stages.2"]),
    (with_nan, ["NaN"]),
    (with_integers, ["not floating point"]),
    (truncated, ["truncated"]),
], ids=["missing_weights", "nan_weights", "integer_weights", "truncated_weights"])
@pytest.mark.parametrize("task", ["pretraining", "fine-tuning"])
def test_a_damaged_start_folder_is_refused(task, damage, words, fcmae_folder, images, tmp_path):
    start = damaged_copy(fcmae_folder, tmp_path / "start", damage)
    make = pretrain_cmd if task == "pretraining" else finetune_cmd
    result = run_as_user(make(images, tmp_path / "out", "--model_name_or_path", str(start)), tmp_path)
    assert_one_line(result, "--model_name_or_path", *words)


@pytest.mark.parametrize("setting, words", [
    ({"image_std": [0.0, 0.2, 0.2]}, ["image_std", "above 0"]),
    ({"image_mean": [0.5, 0.5]}, ["image_mean", "3 numbers"]),
], ids=["zero_std", "mean_of_two"])
def test_a_start_folders_processor_is_checked(setting, words, fcmae_folder, images, tmp_path):
    start = damaged_copy(fcmae_folder, tmp_path / "start", lambda state, _: None)
    settings = json.loads((start / "preprocessor_config.json").read_text()) | setting
    (start / "preprocessor_config.json").write_text(json.dumps(settings))
    result = run_as_user(finetune_cmd(images, tmp_path / "out", "--model_name_or_path", str(start)), tmp_path)
    assert_one_line(result, *words)


def test_a_convnext_v1_folder_is_refused_by_fine_tuning_and_export(images, tmp_path):
    from transformers import ConvNextConfig, ConvNextForImageClassification

    v1 = tmp_path / "v1"
    ConvNextForImageClassification(ConvNextConfig(depths=[1, 1, 1, 1], hidden_sizes=[8, 16, 24, 32])).save_pretrained(v1)
    result = run_as_user(finetune_cmd(images, tmp_path / "out", "--model_name_or_path", str(v1)), tmp_path)
    assert_one_line(result, "'convnext' model", "ConvNeXt V2")
    result = run_as_user([*CLI, "export", "--to", "timm", "--model_name_or_path", str(v1), "--output",
                          str(tmp_path / "timm.safetensors")], tmp_path)
    assert_one_line(result, "'convnext' model")
    assert not (tmp_path / "timm.safetensors").exists()


# --------------------------------------------------------------------------------------------- labels


def logits_of(folder: Path, image: Path) -> tuple[dict, torch.Tensor]:
    model = ConvNextV2ForImageClassification.from_pretrained(folder).eval()
    pixels = ConvNextV2ImageProcessor.from_pretrained(folder)(Image.open(image), return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        return model.config.id2label, model(pixels).logits[0]


def test_label_names_come_from_the_data(images, tmp_path):
    # the same classes in another order: names from the data, the head's rows follow them
    swapped = classifier_folder(tmp_path / "swapped", ["dogs", "cats"])
    out = tmp_path / "same-classes"
    assert_ok(run_as_user(finetune_cmd(images, out, "--model_name_or_path", str(swapped), "--learning_rate", "1e-12"),
                          tmp_path))
    image = next((images / "cats").iterdir())
    before_names, before = logits_of(swapped, image)
    after_names, after = logits_of(out, image)
    assert after_names == {0: "cats", 1: "dogs"} and before_names == {0: "dogs", 1: "cats"}
    assert torch.allclose(after, before.flip(0), atol=1e-4), (before, after)
    # other classes (ants/bees): a new head for cats/dogs
    ants = classifier_folder(tmp_path / "ants", ["ants", "bees"])
    other = tmp_path / "other-classes"
    assert_ok(run_as_user(finetune_cmd(images, other, "--model_name_or_path", str(ants)), tmp_path))
    assert config_of(other)["id2label"] == {"0": "cats", "1": "dogs"}


# --------------------------------------------------------------------------------------------- resuming


def test_resuming_with_another_model_size_is_one_line(images, tmp_path):
    out = tmp_path / "out"
    assert_ok(run_as_user(pretrain_cmd(images, out, "--checkpointing_steps", "1"), tmp_path))
    bigger = TINY_OVERRIDES.replace("hidden_sizes=[8,16,24,32]", "hidden_sizes=[16,16,24,32]")
    result = run_as_user(pretrain_cmd(images, out, "--max_train_steps", "2", "--resume_from_checkpoint", "latest",
                                      "--config_overrides", bigger), tmp_path)
    assert_one_line(result, "--resume_from_checkpoint", "different model", "--config_overrides")


@pytest.mark.parametrize("script", ["pretraining", "fine-tuning"])
def test_resuming_from_truncated_checkpoint_weights_is_one_line(script, images, tmp_path):
    out = tmp_path / "out"
    if script == "pretraining":
        first = pretrain_cmd(images, out, "--checkpointing_steps", "1")
    else:
        first = finetune_cmd(images, out, "--save_strategy", "steps", "--save_steps", "1")
    assert_ok(run_as_user(first, tmp_path))
    weights = out / "checkpoint-1" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    more = "--max_train_steps" if script == "pretraining" else "--max_steps"
    result = run_as_user([*first, more, "2", "--resume_from_checkpoint", "latest"], tmp_path)
    assert_one_line(result, "--resume_from_checkpoint", "model.safetensors", "truncated")


def test_a_finished_fine_tuning_run_resumed_with_more_epochs_goes_on(images, tmp_path):
    out = tmp_path / "out"
    once = finetune_cmd(images, out, "--max_steps", "-1", "--num_train_epochs", "1", "--save_strategy", "epoch",
                        "--logging_steps", "1")
    assert_ok(run_as_user(once, tmp_path))
    steps = max(h["step"] for h in json.loads((out / "log_history.json").read_text()))
    assert_ok(run_as_user([*once, "--num_train_epochs", "2", "--resume_from_checkpoint", "latest"], tmp_path))
    assert max(h["step"] for h in json.loads((out / "log_history.json").read_text())) == 2 * steps


def test_validation_of_an_epoch_ended_by_a_checkpoint_is_not_lost(images, tmp_path):
    """The checkpoint at an epoch's last step is written before that epoch's validation; a run killed between the
    two and resumed from it validates that epoch first: the history equals the uninterrupted run's."""
    validation = make_image_folder(tmp_path / "val", per_class=2, corrupt=False)
    out = tmp_path / "out"
    # 12 images, batch 4: 3 steps per epoch
    run = pretrain_cmd(images, out, "--validation_dir", str(validation), "--max_train_steps", "6",
                       "--checkpointing_steps", "3")
    assert_ok(run_as_user(run, tmp_path))
    whole = json.loads((out / "train_results.json").read_text())["validation_loss"]
    assert json.loads((out / "checkpoint-3" / "training_state.json").read_text())["validation"] == []
    assert_ok(run_as_user([*run, "--resume_from_checkpoint", str(out / "checkpoint-3")], tmp_path))
    resumed = json.loads((out / "train_results.json").read_text())["validation_loss"]
    assert [step for step, _ in resumed] == [3, 6] == [step for step, _ in whole]
    assert np.allclose(whole, resumed, atol=1e-5), (whole, resumed)


# --------------------------------------------------------------------------------------------- data


def test_linked_class_folders_are_followed_and_broken_links_counted(images, tmp_path):
    root = tmp_path / "linked"
    root.mkdir()
    for name in ("cats", "dogs"):
        (root / name).symlink_to(images / name, target_is_directory=True)
    (root / "cats-extra.png").symlink_to(tmp_path / "nowhere.png")
    out = tmp_path / "out"
    assert_ok(run_as_user(finetune_cmd(root, out), tmp_path))
    assert json.loads((out / "all_results.json").read_text())["ignored_files"] == 1
    assert "9 training and 3 evaluation images, 2 classes" in (out / "README.md").read_text()


@pytest.mark.parametrize("kind", ["dotdot", "hidden_parent"])
def test_relative_and_hidden_parent_paths_find_the_images(kind, tmp_path):
    if kind == "dotdot":
        make_image_folder(tmp_path / "data", per_class=6, corrupt=False)
        (tmp_path / "work").mkdir()
        train, cwd = Path("..") / "data", tmp_path / "work"
    else:
        train, cwd = make_image_folder(tmp_path / ".cache" / "images", per_class=6, corrupt=False), tmp_path
    assert_ok(run_as_user(finetune_cmd(train, tmp_path / "out"), tmp_path, cwd=cwd))


def write_tiff(path: Path, array: np.ndarray) -> Path:
    Image.fromarray(array).save(path)
    return path


@pytest.mark.parametrize("kind, words", [
    ("float_beyond_255", ["Float pixel values", "[0, 255]"]),
    ("int32_beyond_16_bit", ["Integer pixel values", "0..65535"]),
    ("extreme_aspect", ["aspect ratio"]),
])
def test_validation_images_the_processor_cannot_take_fail_before_training(kind, words, images, tmp_path):
    validation = make_image_folder(tmp_path / "val", per_class=2, corrupt=False)
    if kind == "float_beyond_255":
        bad = write_tiff(validation / "cats" / "bad.tif", np.full((40, 40), 1000.0, np.float32))
    elif kind == "int32_beyond_16_bit":
        bad = write_tiff(validation / "cats" / "bad.tif", np.full((40, 40), 100_000, np.int32))
    else:
        bad = validation / "cats" / "bad.png"
        Image.new("RGB", (3000, 20), (10, 20, 30)).save(bad)
    result = run_as_user(finetune_cmd(images, tmp_path / "out", "--validation_dir", str(validation)), tmp_path)
    assert_one_line(result, str(bad), *words)


def test_a_one_image_class_without_a_validation_folder_is_one_line(images, tmp_path):
    root = make_image_folder(tmp_path / "few", per_class=6, corrupt=False)
    (root / "birds").mkdir()
    next((root / "cats").iterdir()).rename(root / "birds" / "only.png")
    result = run_as_user(finetune_cmd(root, tmp_path / "out"), tmp_path)
    assert_one_line(result, "'birds'", "1 image", "--validation_dir")


# --------------------------------------------------------------------------------------------- conversion


def test_converting_a_transformers_folder_keeps_names_and_eps(tmp_path):
    source = classifier_folder(tmp_path / "hf", ["ants", "bees", "wasps"])
    config = config_of(source)
    config["layer_norm_eps"] = 1e-12
    (source / "config.json").write_text(json.dumps(config))
    out = tmp_path / "out"
    assert_ok(run_as_user([*CLI, "convert", "--from", "transformers", "--checkpoint", str(source), "--output_dir",
                           str(out)], tmp_path))
    converted = config_of(out)
    assert converted["id2label"] == {"0": "ants", "1": "bees", "2": "wasps"}
    assert converted["layer_norm_eps"] == 1e-12 and converted["image_size"] == 32


def test_id2label_must_name_every_class(tmp_path):
    source = classifier_folder(tmp_path / "hf", ["ants", "bees", "wasps"])
    (tmp_path / "labels.json").write_text(json.dumps({"0": "a", "2": "c"}))
    result = run_as_user([*CLI, "convert", "--from", "transformers", "--checkpoint", str(source), "--output_dir",
                          str(tmp_path / "out"), "--id2label", str(tmp_path / "labels.json")], tmp_path)
    assert_one_line(result, "--id2label", "0..2")


# --------------------------------------------------------------------------------------------- Python API

API_CASES = """
import numpy as np, torch
from convnextv2_hf import ConvNextV2Config, ConvNextV2ForImageClassification, ConvNextV2ForMaskedImageModeling
from convnextv2_hf import ConvNextV2ImageProcessor
config = ConvNextV2Config(depths=[1, 1, 1, 1], hidden_sizes=[8, 16, 24, 32], patch_size=2, decoder_hidden_size=16,
                          num_labels=3)
processor = ConvNextV2ImageProcessor(size={"shortest_edge": 32})
def outcome(call):
    try:
        call()
        return "ok"
    except ValueError as error:
        return "ValueError: " + str(error)
grey = processor(np.full((40, 50), 200, np.uint8), return_tensors="pt")["pixel_values"]
rgb = processor(np.full((40, 50, 3), 200, np.uint8), return_tensors="pt")["pixel_values"]
white = processor(np.ones((40, 50, 3), bool), return_tensors="pt")["pixel_values"]
full = processor(np.full((40, 50, 3), 255, np.uint8), return_tensors="pt")["pixel_values"]
classifier = ConvNextV2ForImageClassification(config)
pixels = torch.zeros(2, 3, 32, 32)
print({
    "grey_2d": bool(torch.equal(grey, rgb)),
    "bool_is_white": bool(torch.equal(white, full)),
    "fcmae_empty_batch": outcome(lambda: ConvNextV2ForMaskedImageModeling(config)(torch.zeros(0, 3, 32, 32))),
    "bool_labels": outcome(lambda: classifier(pixels, labels=torch.tensor([True, False]))),
    "float_labels": outcome(lambda: ConvNextV2ForImageClassification(config)(pixels, labels=torch.tensor([0.0, 1.0]))),
    "label_out_of_range": outcome(lambda: ConvNextV2ForImageClassification(config)(pixels, labels=torch.tensor([0, 3]))),
    "use_grn_maybe": outcome(lambda: ConvNextV2Config(use_grn="maybe")),
})
"""


def test_python_api_inputs(tmp_path):
    result = run_as_user([sys.executable, "-c", API_CASES], tmp_path)
    assert_ok(result)
    found = eval(result.stdout.strip().splitlines()[-1])  # a dict literal printed by the case script
    assert found["grey_2d"] and found["bool_is_white"]
    assert found["fcmae_empty_batch"].startswith("ValueError: `pixel_values` holds no images")
    for case in ("bool_labels", "float_labels"):
        assert found[case].startswith("ValueError: `labels` must be integer class indices"), found[case]
    assert found["label_out_of_range"].startswith("ValueError: `labels` must lie in 0..2"), found["label_out_of_range"]
    assert found["use_grn_maybe"].startswith("ValueError: `use_grn` must be true or false")
