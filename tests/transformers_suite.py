"""Build a runnable copy of transformers' common model tests from the registry's source distribution.

The sdist of the installed transformers version ships `tests/test_modeling_common.py`,
`tests/test_configuration_common.py`, `tests/test_pipeline_mixin.py` and `tests/test_backbone_common.py`, but not
the few modules they import (export and generation mixins, a dict of common config kwargs, the per-task pipeline
tests, the tiny-model summary). Those are our stand-ins from `transformers_standins/`, each saying what it replaces.
The tree is cached per machine under `~/.cache/convnextv2-hf/`, so the download happens at most once.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import transformers

HERE = Path(__file__).resolve().parent
CACHE = Path.home() / ".cache" / "convnextv2-hf" / f"transformers-tests-{transformers.__version__}"
SHIPPED = ("test_modeling_common.py", "test_configuration_common.py", "test_pipeline_mixin.py",
           "test_backbone_common.py")
STANDINS = {  # path in the test tree <- our stand-in
    "exporters/test_export.py": "export_mixin.py",
    "generation/test_utils.py": "generation_mixin.py",
    "utils/test_configuration_utils.py": "config_common_kwargs.py",
    "pipelines/test_pipelines_image_classification.py": "image_classification_pipeline.py",
    "pipelines/test_pipelines_image_feature_extraction.py": "image_feature_extraction_pipeline.py",
}


def download_sdist(target: Path) -> Path:
    """`pip download --no-deps --no-binary :all: transformers==<installed version>` into `target`."""
    spec = f"transformers=={transformers.__version__}"
    result = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", spec,
                             "-d", str(target), "-q"], capture_output=True, text=True, timeout=600)
    archives = list(target.glob("transformers-*.tar.gz"))
    if result.returncode != 0 or not archives:
        raise ConnectionError(result.stderr.strip().splitlines()[-1] if result.stderr.strip() else "pip download failed")
    return archives[0]


def extract_common_tests(archive: Path, tests: Path) -> None:
    with tarfile.open(archive) as tar:
        for name in SHIPPED:
            member = tar.getmember(f"{archive.name.removesuffix('.tar.gz')}/tests/{name}")
            tests.joinpath(name).write_bytes(tar.extractfile(member).read())


def write_if_changed(path: Path, data: bytes) -> None:
    """Rewrite only what differs: another pytest worker may be importing these files right now."""
    if not path.is_file() or path.read_bytes() != data:
        path.write_bytes(data)


def add_standins(root: Path) -> None:
    tests = root / "tests"
    for package in (tests, tests / "exporters", tests / "generation", tests / "utils", tests / "pipelines"):
        package.mkdir(parents=True, exist_ok=True)
        (package / "__init__.py").touch()
    for target, source in STANDINS.items():
        write_if_changed(tests / target, (HERE / "transformers_standins" / source).read_bytes())
    write_if_changed(tests / "utils" / "tiny_model_summary.json", b"{}")  # the Hub's tiny models are not used offline
    # test_pipeline_mixin imports transformers "directly" from ../src/transformers; an empty module there makes that
    # resolve to the installed package (the function returns sys.modules["transformers"]).
    (root / "src" / "transformers").mkdir(parents=True, exist_ok=True)
    (root / "src" / "transformers" / "__init__.py").touch()


def transformers_test_tree() -> tuple[Path | None, str]:
    """(root of the test tree, "") or (None, why it could not be built); one pytest worker at a time builds it."""
    from filelock import FileLock

    CACHE.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(CACHE) + ".lock"):
        return build_test_tree()


def build_test_tree() -> tuple[Path | None, str]:
    if all((CACHE / "tests" / name).is_file() for name in SHIPPED):
        add_standins(CACHE)  # cheap, and keeps the stand-ins in step with this checkout
        return CACHE, ""
    with tempfile.TemporaryDirectory() as download:
        try:
            archive = download_sdist(Path(download))
        except (ConnectionError, OSError, subprocess.TimeoutExpired) as error:
            return None, f"the package registry could not be reached for transformers' sdist ({error})"
        staging = CACHE.with_name(CACHE.name + ".partial")
        shutil.rmtree(staging, ignore_errors=True)
        (staging / "tests").mkdir(parents=True)
        extract_common_tests(archive, staging / "tests")
        shutil.rmtree(CACHE, ignore_errors=True)
        staging.rename(CACHE)
    add_standins(CACHE)
    return CACHE, ""
