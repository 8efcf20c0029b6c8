"""Every command block of the README and of the pages in docs/ that a user would copy runs as typed, in a fresh shell
process (stdin closed, offline, a timeout), in a scratch folder that holds the inputs they name.

Two blocks are not run here: the quick start (the demo; `test_demo.py` runs its `--quick` twin) and the test-suite
command (it is what CI runs). Long trainings run as their tiny twins: the substitutions below shrink sizes and
steps, and the test fails if one of them no longer matches the README (so the twin cannot drift away silently).
"""

import os
import re
import sys
from pathlib import Path

import pytest
import torch

from conftest import REPO, make_image_folder, perturbed, user_env, write_photo
from convnextv2_hf import ConvNextV2Config, ConvNextV2ForImageClassification, ConvNextV2ForMaskedImageModeling
from convnextv2_hf.convert_convnextv2 import export_checkpoint

PAGES = [REPO / "README.md"] + sorted((REPO / "docs").glob("*.md"))  # README first: the pages use what it saves
NOT_RUN = ("convnextv2-hf demo", "python -m pytest")  # the quick start, and the test-suite command itself
TWINS = [  # (README text, tiny twin): sizes and steps only, never the flags' meaning
    ("--image_size 224", "--image_size 64"),
    ("--per_device_train_batch_size 64", "--per_device_train_batch_size 4"),
    ("--num_train_epochs 100", "--max_train_steps 2"),
    ("--num_train_epochs 50", "--num_train_epochs 1"),
    ("--checkpointing_steps 1000", "--checkpointing_steps 1"),
    ("--max_train_steps 250000", "--max_train_steps 2"),
]


def blocks(language: str) -> list[str]:
    return [block for page in PAGES for block in re.findall(rf"```{language}\n(.*?)```", page.read_text(), flags=re.S)]


def shell_commands(block: str) -> list[str]:
    """The commands of a bash block: continuation lines joined, comments dropped."""
    joined = re.sub(r"\\\n\s*", " ", block)
    return [line.strip() for line in joined.splitlines() if line.strip() and not line.strip().startswith("#")]


def tiny_twin(command: str, used: set) -> str:
    for text, twin in TWINS:
        if text in command:
            command = command.replace(text, twin)
            used.add(text)
    return command


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A scratch folder with what the README's commands read: images, a photo, and foreign checkpoints."""
    root = tmp_path_factory.mktemp("readme")
    (root / "examples").symlink_to(REPO / "examples")
    make_image_folder(root / "my_images" / "batch1", per_class=4, corrupt=False)  # any depth is fine
    make_image_folder(root / "labelled", classes=("cat", "dog"), per_class=6, corrupt=False)
    write_photo(root / "cat.jpg")
    atto = ConvNextV2Config.from_preset("atto", num_labels=1000)
    export_checkpoint(perturbed(ConvNextV2ForImageClassification(atto)), "reference", root / "convnextv2_atto_1k_224_ema.pt")
    export_checkpoint(perturbed(ConvNextV2ForMaskedImageModeling(atto)), "reference",
                      root / "convnextv2_atto_1k_224_fcmae.pt")
    export_checkpoint(perturbed(ConvNextV2ForImageClassification(atto)), "timm", root / "model.safetensors")
    (root / "imagenet_labels.json").write_text(str([f"class {i}" for i in range(1000)]).replace("'", '"'))
    return root


def run_in(workdir: Path, command: list[str], timeout: int = 600):
    import subprocess

    env = user_env(workdir, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    result = subprocess.run(command, cwd=workdir, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                            timeout=timeout)
    assert result.returncode == 0, f"{command}\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}"
    return result


def test_every_block_is_covered():
    bash, python = blocks("bash"), blocks("python")
    assert len(bash) >= 4 and len(python) >= 2
    assert sum(any(marker in block for marker in NOT_RUN) for block in bash) == 2


@pytest.mark.slow
def test_readme_commands_run_as_typed(workdir):
    used: set = set()
    for block in blocks("python"):  # in README order: later blocks use what earlier ones saved
        script = workdir / "snippet.py"
        script.write_text(block)
        run_in(workdir, [sys.executable, str(script)])
    for block in blocks("bash"):
        if any(marker in block for marker in NOT_RUN):
            continue
        for command in shell_commands(block):
            command = tiny_twin(command, used)
            if command.startswith("python -c"):  # a plain-transformers command: prove it never imports us
                command = command.replace("python -c", "python -X importtime -c", 1)
                result = run_in(workdir, ["bash", "-c", command])
                assert "'label'" in result.stdout and "convnextv2_hf" not in result.stderr
            else:
                run_in(workdir, ["bash", "-c", command])
    assert used == {text for text, _ in TWINS}, f"twins that no longer match the README: {set(dict(TWINS)) - used}"
    assert (workdir / "atto-finetuned" / "model.safetensors").exists()
    assert torch.load(workdir / "fcmae-atto.pth", weights_only=True)["model"]


def test_the_readme_is_a_front_page_whose_links_resolve():
    """At most 250 lines; every relative link of the README and the docs pages names a file that exists, and every
    `#anchor` a heading of its page (GitHub's rule: lower case, punctuation dropped, spaces as hyphens)."""
    assert len((REPO / "README.md").read_text().splitlines()) <= 250
    broken = []
    for page in PAGES:
        for target in re.findall(r"\]\(([^)\s]+)\)|src=\"([^\"]+)\"", page.read_text()):
            target = next(t for t in target if t)
            if target.startswith(("http://", "https://")):
                continue
            path, _, anchor = target.partition("#")
            linked = (page.parent / path).resolve() if path else page
            if not linked.exists():
                broken.append(f"{page.name}: {target}")
            elif anchor:
                headings = re.findall(r"^#+ (.+)$", linked.read_text(), flags=re.M)
                slugs = {re.sub(r"[^\w\- ]", "", h.lower()).replace(" ", "-") for h in headings}
                if anchor not in slugs:
                    broken.append(f"{page.name}: {target}")
    assert not broken, broken
