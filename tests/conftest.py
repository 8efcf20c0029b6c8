"""Shared test setup: offline environment, tiny configs and models, image folders, user-side subprocesses."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import subprocess  # noqa: E402
import sys  # noqa: E402
import textwrap  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from convnextv2_hf import ConvNextV2Config, ConvNextV2ForMaskedImageModeling  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
# --config_overrides of a tiny four-stage model (2 px stem, 16 px mask cell) for the script tests.
TINY_OVERRIDES = "depths=[1,1,1,1],hidden_sizes=[8,16,24,32],patch_size=2,decoder_hidden_size=16"
# Appended to code run as a user would: proves the process never imported this package.
NOT_IMPORTED = "\nimport sys\nassert 'convnextv2_hf' not in sys.modules, 'convnextv2_hf was imported'\n"


def tiny_config(**kwargs) -> ConvNextV2Config:
    """A four-stage model small enough for unit tests; mask cell 16 px with a 2 px stem."""
    defaults = dict(
        depths=[1, 1, 2, 1], hidden_sizes=[8, 16, 24, 32], patch_size=2, decoder_hidden_size=16, num_labels=3
    )
    defaults.update(kwargs)
    return ConvNextV2Config(**defaults)


def with_active_grn(model, std: float = 0.5):
    """GRN parameters are zero at initialisation (GRN is then the identity); draw them so that GRN matters."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".grn." in name:
                p.normal_(0, std)
    return model


def active_mim(config=None, **kwargs):
    """An FCMAE model with non-zero GRN, built from `config` or `tiny_config(**kwargs)`."""
    return with_active_grn(ConvNextV2ForMaskedImageModeling(config or tiny_config(**kwargs)))


def perturbed(model, std: float = 0.1):
    """Add noise to every parameter (no structure left at its initial value), in eval mode."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * std)
    return model.eval()


@pytest.fixture
def config():
    return tiny_config()


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def user_env(tmp_path=None, **extra) -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", PYTHONPATH="", **extra)
    if tmp_path is not None:
        env["HF_MODULES_CACHE"] = str(Path(tmp_path) / "hf-modules")
    return env


def run_as_user(command: list[str], tmp_path=None, timeout: int = 300, cwd=None, **env) -> subprocess.CompletedProcess:
    """Run `command` as a user's shell would: a fresh process, stdin closed (any prompt fails), a timeout."""
    return subprocess.run(command, env=user_env(tmp_path, **env), stdin=subprocess.DEVNULL, capture_output=True,
                          text=True, timeout=timeout, cwd=cwd or REPO)


# The user's commands, run in a fresh process by `run_as_user`.
CLI = [sys.executable, "-m", "convnextv2_hf.cli"]
PRETRAIN = [sys.executable, str(REPO / "examples" / "pretraining" / "run_fcmae.py")]
FINETUNE = [sys.executable, str(REPO / "examples" / "classification" / "run_finetune.py")]


def assert_ok(result: subprocess.CompletedProcess) -> str:
    """The command succeeded; returns what it printed (stdout, then stderr)."""
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout + result.stderr


def assert_one_line(result: subprocess.CompletedProcess, *words: str) -> None:
    """The command failed as an expected error does: exit 2, one `error:` line naming `words`, no traceback."""
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode == 2 and len(errors) == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
    for word in words:
        assert word in errors[0], (word, errors[0])


def run_plain_python(code: str, tmp_path, timeout: int = 300, python: str = sys.executable) -> str:
    """Run `code` in a fresh interpreter that never imports this package (asserted at its end); returns stdout."""
    result = run_as_user([python, "-c", textwrap.dedent(code) + NOT_IMPORTED], tmp_path, timeout)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return result.stdout


LAUNCH = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--mixed_precision", "no",
          "--dynamo_backend", "no"]


# FSDP2 with each ConvNeXt V2 block a shard unit and sharded checkpoints, as the README's command; on CPU processes
# through fixtures/fsdp_on_cpu.py (Accelerate itself takes the FSDP path only on GPU-like devices).
FSDP_LAUNCH = [sys.executable, "-m", "accelerate.commands.launch", "--use_fsdp", "--fsdp_version", "2",
               "--fsdp_auto_wrap_policy", "TRANSFORMER_BASED_WRAP", "--fsdp_transformer_layer_cls_to_wrap",
               "ConvNextV2Layer", "--fsdp_state_dict_type", "SHARDED_STATE_DICT", "--mixed_precision", "no",
               "--dynamo_backend", "no"]
FSDP_ON_CPU = REPO / "tests" / "fixtures" / "fsdp_on_cpu.py"


def free_port() -> str:
    """A port nobody listens on now: launches of tests running side by side (pytest -n) must not meet."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return str(probe.getsockname()[1])


def launch_two_processes(script, args, timeout: int = 300, launch=LAUNCH, **env) -> subprocess.CompletedProcess:
    """`accelerate launch --multi_gpu --num_processes 2` of a script: CPU data parallelism over gloo."""
    result = run_as_user([*launch, "--num_processes", "2", "--num_machines", "1", "--main_process_port", free_port(),
                          str(script), *args], timeout=timeout, **env)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def launch_as_two_machines(script, args, timeout: int = 300) -> list[str]:
    """Two `accelerate launch --num_machines 2 --machine_rank R` commands on this host, one process each, meeting at
    127.0.0.1 as two machines of a cluster would at their main machine; returns each one's stdout."""
    port = free_port()
    machines = [subprocess.Popen(
        [*LAUNCH, "--num_processes", "2", "--num_machines", "2", "--machine_rank", str(rank), "--main_process_ip",
         "127.0.0.1", "--main_process_port", port, str(script), *args], env=user_env(), stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO) for rank in (0, 1)]
    outputs = [machine.communicate(timeout=timeout) for machine in machines]
    for machine, (_, stderr) in zip(machines, outputs):
        assert machine.returncode == 0, stderr[-3000:]
    return [stdout for stdout, _ in outputs]


def make_image_folder(root, classes=("cats", "dogs"), per_class=6, size_range=(40, 90), corrupt=True, seed=0):
    """A small image folder with mixed modes (RGB, L, P, RGBA, I;16) and sizes, plus one corrupt file."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    modes = ["RGB", "L", "P", "RGBA", "I;16"]
    for c, name in enumerate(classes):
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            w, h = rng.integers(*size_range, size=2)
            base = np.zeros((h, w, 3), dtype=np.uint8)
            base[..., c % 3] = 200  # class colour
            base[rng.integers(0, h // 2):, : rng.integers(w // 3, w)] += rng.integers(0, 55, dtype=np.uint8)
            image = Image.fromarray(base)
            mode = modes[(i + c) % len(modes)]
            if mode == "I;16":
                image = Image.fromarray((np.asarray(image.convert("L"), dtype=np.uint16) * 257))
            else:
                image = image.convert(mode)
            image.save(folder / f"{i}.png")
    if corrupt:
        (root / classes[0] / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nthis is not a png")
    return root


# --------------------------------------------------------------------------------------------- serving parity

# Set by .ci/run: a second environment with torchvision, where transformers picks its torchvision processors.
TORCHVISION_PYTHON = os.environ.get("CONVNEXTV2_TEST_TORCHVISION_PYTHON")


def python_for(environment: str) -> str:
    """The interpreter of the environment `"without torchvision"` (this one) or `"with torchvision"`."""
    if environment == "without torchvision":
        return sys.executable
    if not TORCHVISION_PYTHON:
        pytest.skip("CONVNEXTV2_TEST_TORCHVISION_PYTHON is not set: no environment with torchvision to test against "
                    "(.ci/run builds one)")
    return TORCHVISION_PYTHON


def write_photo(path, size=(517, 333), orientation: int = 6, seed: int = 0):
    """A photo-like JPEG (smooth gradients, texture, blobs) of an odd size, with an EXIF orientation tag."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    w, h = size
    y, x = np.mgrid[0:h, 0:w] / max(size)
    image = np.stack([np.sin(6 * x + 2 * y), np.cos(5 * y - 3 * x), np.sin(9 * x * y)], -1) * 60 + 120
    for _ in range(6):
        cy, cx, r = rng.uniform(0, 1), rng.uniform(0, 1), rng.uniform(0.05, 0.2)
        image[(y - cy) ** 2 + (x - cx) ** 2 < r**2] = rng.uniform(0, 255, 3)
    image = np.clip(image + rng.normal(0, 8, image.shape), 0, 255).astype(np.uint8)
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(image).save(path, quality=90, exif=exif)
    return path


PLAIN_TRANSFORMERS_SERVING = """
import json, sys, torch
from transformers import AutoImageProcessor, AutoModelForImageClassification, pipeline
from transformers.image_utils import load_image
folder, image, out = sys.argv[1:4]
scores = pipeline("image-classification", model=folder)(image, top_k=None)
processor = AutoImageProcessor.from_pretrained(folder)
model = AutoModelForImageClassification.from_pretrained(folder).eval()
pixels = processor(load_image(image), return_tensors="pt")["pixel_values"]
with torch.no_grad():
    logits = model(pixels).logits
torch.save({"scores": scores, "pixels": pixels, "logits": logits,
            "classes": [type(x).__module__ + "." + type(x).__name__ for x in (processor, model)]}, out)
"""

OURS_SERVING = """
import sys, torch
from convnextv2_hf import ConvNextV2ForImageClassification, ConvNextV2ImageProcessor
from convnextv2_hf.training.data.decoding import decode_image
folder, image, out = sys.argv[1:4]
processor = ConvNextV2ImageProcessor.from_pretrained(folder)
model = ConvNextV2ForImageClassification.from_pretrained(folder).eval()
pixels = processor(decode_image({"path": image}), return_tensors="pt")["pixel_values"]
with torch.no_grad():
    logits = model(pixels).logits
torch.save({"pixels": pixels, "logits": logits, "id2label": model.config.id2label}, out)
"""


def assert_served_like_ours(folder, image, tmp_path, environment: str = "without torchvision") -> dict:
    """Plain transformers (a fresh process that never imports this package) serves `folder` with its own classes,
    and its pixels, logits and pipeline scores equal ours (1e-5) in the same environment."""
    python = python_for(environment)
    plain, ours = tmp_path / "plain.pt", tmp_path / "ours.pt"
    code = PLAIN_TRANSFORMERS_SERVING.replace("sys.argv[1:4]", repr([str(folder), str(image), str(plain)]))
    run_plain_python(code, tmp_path, python=python)
    result = run_as_user([python, "-c", OURS_SERVING, str(folder), str(image), str(ours)], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    plain, ours = torch.load(plain, weights_only=False), torch.load(ours, weights_only=False)
    assert all(name.startswith("transformers.") for name in plain["classes"]), plain["classes"]
    assert (plain["pixels"] - ours["pixels"]).abs().max() <= 1e-5
    assert (plain["logits"] - ours["logits"]).abs().max() <= 1e-5
    probabilities = ours["logits"].softmax(-1)[0]
    for entry in plain["scores"]:
        label_index = {v: int(k) for k, v in ours["id2label"].items()}[entry["label"]]
        assert abs(entry["score"] - probabilities[label_index].item()) <= 1e-5
    return plain
