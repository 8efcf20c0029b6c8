"""Every expected error at every entry point is one line naming the input and the fix, with exit code 2 and no
traceback (unless asked for with --debug or CONVNEXTV2_HF_DEBUG=1)."""

import json
import os
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import REPO, TINY_OVERRIDES, make_image_folder, perturbed, run_as_user, tiny_config
from convnextv2_hf import ConvNextV2ForImageClassification, ConvNextV2ForMaskedImageModeling
from convnextv2_hf.cli import dispatch, run_entry_point
from convnextv2_hf.convert_convnextv2 import export_checkpoint, from_our_layout
from convnextv2_hf.training.finetune import main as finetune_main
from convnextv2_hf.training.pretrain import main as pretrain_main

PRETRAIN_SCRIPT = REPO / "examples" / "pretraining" / "run_fcmae.py"
FINETUNE_SCRIPT = REPO / "examples" / "classification" / "run_finetune.py"


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """Damaged and awkward inputs, each named after what is wrong with it."""
    root = tmp_path_factory.mktemp("bad")
    (root / "empty.pth").write_bytes(b"")
    (root / "notes.pth").write_text("hello, this is not a checkpoint\n")
    (root / "zipped.pth").write_bytes(b"PK\x03\x04" + os.urandom(300))
    reference = from_our_layout(ConvNextV2ForImageClassification(tiny_config()).state_dict(), "reference")
    torch.save({"model": {k: (v * 100).long() if k == "head.weight" else v for k, v in reference.items()}},
               root / "integer.pth")
    torch.save({"model": {k: v.fill_(float("nan")) if k == "stages.0.0.dwconv.weight" else v
                          for k, v in dict(reference).items()}}, root / "nan.pth")
    export_checkpoint(perturbed(ConvNextV2ForImageClassification(tiny_config())), "reference", root / "good.pth")
    (root / "a-file").write_text("x")
    make_image_folder(root / "images", per_class=3, corrupt=False)
    make_image_folder(root / "with-broken", per_class=3)
    (root / "no-images").mkdir()
    (root / "no-images" / "readme.txt").write_text("no images here")
    make_image_folder(root / "one-class", classes=("cats",), per_class=3, corrupt=False)
    make_image_folder(root / "nested" / "cats" / "deeper", classes=("x", "y"), per_class=2, corrupt=False)
    make_image_folder(root / "nested" / "dogs" / "deeper", classes=("x", "y"), per_class=2, corrupt=False)
    loose = make_image_folder(root / "loose", per_class=3, corrupt=False)
    Image.new("RGB", (40, 40)).save(loose / "stray.png")
    meta = make_image_folder(root / "with-metadata", per_class=3, corrupt=False)
    (meta / "metadata.csv").write_text("file_name,text\ncats/0.png,a cat\n")
    make_image_folder(root / "three-classes", classes=("cats", "dogs", "fish"), per_class=2, corrupt=False)
    validation = make_image_folder(root / "bad-validation", per_class=2, corrupt=False)
    (validation / "dogs" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\ngarbage")
    ConvNextV2ForImageClassification(tiny_config(num_labels=3)).save_pretrained(root / "three-class-model")
    ConvNextV2ForMaskedImageModeling(tiny_config()).save_pretrained(root / "taken")
    return root


def assert_one_line_error(capsys, code: int, *names: str) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2, err[-2000:]
    assert len(lines) == 1 and "Traceback" not in err, err[-2000:]
    for name in names:
        assert name in lines[0], (name, lines[0])
    return lines[0]


CONVERT_CASES = {
    "empty file": (["--checkpoint", "{root}/empty.pth"], ["empty.pth", "0 bytes"]),
    "text file": (["--checkpoint", "{root}/notes.pth"], ["notes.pth", "not a PyTorch checkpoint"]),
    "random bytes with a zip header": (["--checkpoint", "{root}/zipped.pth"], ["zipped.pth", "readable PyTorch"]),
    "missing file": (["--checkpoint", "{root}/nowhere.pth"], ["nowhere.pth", "does not exist"]),
    "integer weights": (["--checkpoint", "{root}/integer.pth"], ["head.weight", "torch.int64"]),
    "NaN weights": (["--checkpoint", "{root}/nan.pth"], ["stages.0.0.dwconv.weight", "NaN"]),
    "output is a file": (["--checkpoint", "{root}/good.pth", "--output_dir", "{root}/a-file"], ["a-file", "is a file"]),
    "output holds a model": (["--checkpoint", "{root}/good.pth", "--output_dir", "{root}/taken"],
                             ["taken", "--overwrite_output_dir"]),
    "push offline": (["--checkpoint", "{root}/good.pth", "--push_to_hub"], ["HF_HUB_OFFLINE"]),
}


@pytest.mark.parametrize("case", sorted(CONVERT_CASES))
def test_convert(inputs, tmp_path, capsys, case):
    args, names = CONVERT_CASES[case]
    argv = ["convert", "--from", "reference", "--output_dir", str(tmp_path / "out")]
    argv += [a.format(root=inputs) for a in args]
    assert_one_line_error(capsys, run_entry_point(dispatch, argv), *names)


EXPORT_CASES = {
    "output is a folder": (["--model_name_or_path", "{root}/taken", "--output", "{root}"], ["is a folder"]),
    "model folder missing": (["--model_name_or_path", "{root}/no-such-model", "--output", "{root}/x.pth"],
                             ["no-such-model", "not a model folder"]),
}


@pytest.mark.parametrize("case", sorted(EXPORT_CASES))
def test_export(inputs, capsys, case):
    args, names = EXPORT_CASES[case]
    argv = ["export", "--to", "reference"] + [a.format(root=inputs) for a in args]
    assert_one_line_error(capsys, run_entry_point(dispatch, argv), *names)


PRETRAIN_CASES = {
    "train_dir missing": (["--train_dir", "{root}/nowhere"], ["nowhere", "not a directory"]),
    "train_dir without images": (["--train_dir", "{root}/no-images"], ["no-images", "no image files", "readme.txt"]),
    "stray metadata.csv": (["--train_dir", "{root}/with-metadata"], ["metadata.csv", "--ignore_metadata"]),
    "output is a file": (["--output_dir", "{root}/a-file"], ["a-file", "is a file"]),
    "output holds a run": (["--output_dir", "{root}/taken"], ["taken", "--resume_from_checkpoint"]),
    "misspelled override": (["--config_overrides", "decoder_hiden_size=64"], ["decoder_hiden_size", "decoder_hidden_size"]),
    "zero steps": (["--max_train_steps", "0"], ["--max_train_steps 0"]),
    "zero learning rate": (["--learning_rate", "0"], ["--learning_rate 0"]),
    "corrupt image": (["--train_dir", "{root}/with-broken"], ["broken.png", "--skip_corrupt_images"]),
    "image size off the cell": (["--image_size", "40"], ["--image_size 40", "mask cell"]),
    "unreadable validation image": (["--validation_dir", "{root}/bad-validation"], ["broken.png"]),
    "streaming without steps": (["--streaming", "--max_train_steps", "-1"], ["--max_train_steps -1"]),
}


@pytest.mark.parametrize("case", sorted(PRETRAIN_CASES))
def test_run_fcmae(inputs, tmp_path, capsys, case):
    args, names = PRETRAIN_CASES[case]
    argv = ["--train_dir", str(inputs / "images"), "--output_dir", str(tmp_path / "out"), "--config_overrides",
            TINY_OVERRIDES, "--image_size", "32", "--per_device_train_batch_size", "2", "--max_train_steps", "1"]
    argv += [a.format(root=inputs) for a in args]
    assert_one_line_error(capsys, run_entry_point(pretrain_main, argv), *names)


FINETUNE_CASES = {
    "one class folder": (["--train_dir", "{root}/one-class"], ["only one class folder", "cats"]),
    "images nested deeper": (["--train_dir", "{root}/nested"], ["nested below the class folders"]),
    "images beside the class folders": (["--train_dir", "{root}/loose"], ["directly inside", "stray.png"]),
    "train_dir without images": (["--train_dir", "{root}/no-images"], ["no-images", "no image files"]),
    "stray metadata.csv": (["--train_dir", "{root}/with-metadata"], ["metadata.csv"]),
    "classes differ": (["--validation_dir", "{root}/three-classes"], ["Class mismatch", "fish"]),
    "head of another size": (["--model_name_or_path", "{root}/three-class-model"],
                             ["classifies 3 classes", "--ignore_mismatched_sizes"]),
    "output is a file": (["--output_dir", "{root}/a-file"], ["a-file", "is a file"]),
    "missing label column": (["--label_column_name", "species"], ["species"]),
    "unreadable validation image": (["--validation_dir", "{root}/bad-validation"], ["broken.png"]),
    "negative drop path": (["--drop_path_rate", "-0.1"], ["--drop_path_rate -0.1"]),
}


@pytest.mark.parametrize("case", sorted(FINETUNE_CASES))
def test_run_finetune(inputs, tmp_path, capsys, case):
    args, names = FINETUNE_CASES[case]
    argv = ["--train_dir", str(inputs / "images"), "--output_dir", str(tmp_path / "out"), "--config_overrides",
            TINY_OVERRIDES, "--image_size", "32", "--per_device_train_batch_size", "2", "--max_steps", "1",
            "--report_to", "none", "--train_val_split", "0.5"]
    argv += [a.format(root=inputs) for a in args]
    assert_one_line_error(capsys, run_entry_point(finetune_main, argv, debug_flag=False), *names)


def test_scripts_as_typed_print_one_line_and_tracebacks_on_request(inputs, tmp_path):
    commands = {
        "run_fcmae.py": [sys.executable, str(PRETRAIN_SCRIPT), "--train_dir", str(inputs / "no-images"),
                         "--output_dir", str(tmp_path / "a")],
        "run_finetune.py": [sys.executable, str(FINETUNE_SCRIPT), "--train_dir", str(inputs / "one-class"),
                            "--output_dir", str(tmp_path / "b")],
        "convnextv2-hf": [str(REPO / ".venv" / "bin" / "convnextv2-hf") if (REPO / ".venv").exists()
                          else "convnextv2-hf", "convert", "--from", "reference", "--checkpoint",
                          str(inputs / "empty.pth"), "--output_dir", str(tmp_path / "c")],
    }
    for name, command in commands.items():
        quiet = run_as_user(command, tmp_path)
        assert quiet.returncode == 2 and "Traceback" not in quiet.stderr, (name, quiet.stderr[-2000:])
        assert len([line for line in quiet.stderr.splitlines() if line.startswith("error:")]) == 1, name
        loud = run_as_user(command, tmp_path, CONVNEXTV2_HF_DEBUG="1")
        assert loud.returncode != 0 and "Traceback" in loud.stderr, name


def test_config_ranges_and_fields_are_checked_on_every_path(tmp_path):
    from convnextv2_hf import ConvNextV2Config

    for bad in (dict(mask_ratio=1.5), dict(mask_ratio=0), dict(decoder_depth=-1), dict(decoder_hidden_size=0),
                dict(sparse_backend="cuda-magic"), dict(mask_strategy="mixup"), dict(depths=[1, 0, 1, 1]),
                dict(hidden_sizes=[8, 16, 24]), dict(drop_path_rate=1.0), dict(patch_size=0)):
        with pytest.raises(ValueError):
            ConvNextV2Config(**bad)
    config = ConvNextV2Config()
    with pytest.raises(ValueError, match="mask_ratio"):
        config.mask_ratio = 1.5  # assignment is checked too (from_pretrained applies overrides this way)
    config.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="mask_ratio"):
        ConvNextV2Config.from_pretrained(tmp_path, mask_ratio=2.0)


@pytest.mark.parametrize("dtype", [torch.uint8, torch.float64, torch.float16])
def test_forward_names_dtype_problems_and_the_processor(dtype):
    model = ConvNextV2ForImageClassification(tiny_config()).eval()
    pixels = torch.zeros(1, 3, 32, 32, dtype=dtype)
    with pytest.raises(ValueError, match=rf"pixel_values. has dtype {dtype}.*ConvNextV2ImageProcessor"):
        model(pixels)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # under autocast the conv takes care of it
        assert model(torch.randn(1, 3, 32, 32)).logits.shape == (1, 3)


def test_forward_names_too_small_images():
    model = ConvNextV2ForImageClassification(tiny_config()).eval()
    with pytest.raises(ValueError, match=r"8x8 px, smaller than the network's total stride \(16 px\)"):
        model(torch.randn(1, 3, 8, 8))
    assert np.isfinite(model(torch.randn(1, 3, 16, 16)).logits.detach().numpy()).all()


def test_hub_token_reaches_the_upload(inputs, tmp_path, monkeypatch):
    seen = {}
    monkeypatch.setattr("convnextv2_hf.hub.ensure_hub_available", lambda action, token=None: None)
    monkeypatch.setattr("convnextv2_hf.hub.push_folder_to_hub",
                        lambda folder, repo, token=None, **kw: seen.update(folder=folder, repo=repo, token=token))
    assert 0 == run_entry_point(dispatch, ["convert", "--from", "reference", "--checkpoint", str(inputs / "good.pth"),
                                           "--output_dir", str(tmp_path / "out"), "--push_to_hub", "--hub_model_id",
                                           "me/model", "--hub_token", "hf_secret"])
    assert seen == {"folder": str(tmp_path / "out"), "repo": "me/model", "token": "hf_secret"}
    assert json.loads((tmp_path / "out" / "config.json").read_text())["model_type"] == "convnextv2"


def test_every_command_line_option_says_what_it_does_and_its_default(tmp_path):
    import argparse

    from conftest import CLI, assert_ok, run_as_user
    from convnextv2_hf.cli import build_parser
    from convnextv2_hf.demo import build_parser as demo_parser

    commands = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    parsers = {name: p for name, p in commands.choices.items() if name != "demo"} | {"demo": demo_parser()}
    silent = [f"{name} {action.option_strings[0]}" for name, parser in parsers.items() for action in parser._actions
              if action.option_strings and action.option_strings[0] != "-h" and not action.help]
    assert not silent, silent
    shown = assert_ok(run_as_user(CLI + ["write-shards", "--help"], tmp_path, timeout=60))
    assert "(default: 1000)" in shown and "(default: webdataset)" in shown
    assert "(default: 1500)" in assert_ok(run_as_user(CLI + ["demo", "--help"], tmp_path, timeout=60))
