"""How the code is laid out: short functions, and a model side that checkpoints can carry."""

import ast
import sys

import pytest

from conftest import REPO, tiny_config
from convnextv2_hf import ConvNextV2ForMaskedImageModeling, ConvNextV2ImageProcessor

MAX_FUNCTION_LINES = 60
# What the copied files may import besides each other: the standard library, torch, transformers,
# transformers' own image-processing dependencies (numpy, PIL), and the optional sparse engine (imported lazily,
# only when sparse_backend="minkowski" is chosen).
SHIPPED_MAY_IMPORT = {"torch", "transformers", "numpy", "PIL", "MinkowskiEngine"} | set(sys.stdlib_module_names)


def python_files(*folders: str):
    for folder in folders:
        yield from sorted((REPO / folder).rglob("*.py"))


def test_no_function_is_longer_than_sixty_lines():
    long = []
    for path in python_files("src", "examples", "benchmarks"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(REPO)}:{node.lineno} {node.name} ({lines} lines)")
    assert not long, long


def dotted(node: ast.AST) -> str:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
    return ".".join(reversed(parts))


def test_checkpoints_carry_flat_files_that_import_only_each_other_torch_and_transformers(tmp_path):
    ConvNextV2ForMaskedImageModeling(tiny_config()).save_pretrained(tmp_path)
    ConvNextV2ImageProcessor().save_pretrained(tmp_path)
    shipped = {path.stem: path for path in tmp_path.glob("*.py")}
    assert {"configuration_convnextv2", "modeling_convnextv2", "image_processing_convnextv2", "sparse_backends",
            "sparse_ops", "masking"} <= set(shipped)
    for name, path in shipped.items():
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level:
                assert node.level == 1 and node.module in shipped, (name, node.module)
            elif isinstance(node, (ast.Import, ast.ImportFrom)):
                modules = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module]
                for module in modules:
                    assert module.split(".")[0] in SHIPPED_MAY_IMPORT, (name, module)
            elif isinstance(node, ast.Attribute):
                chain = dotted(node)
                private = chain.startswith("torch.") and any(p.startswith("_") for p in chain.split(".")[1:])
                assert not chain.startswith("torch.ops") and not private, (name, chain)


REMOVED_IN_0_3 = ("pretrain", "finetune", "data", "transforms", "optim", "plots", "model_card")


def test_the_deprecated_root_modules_are_gone_and_the_changelog_says_where_they_went():
    import importlib

    changelog = (REPO / "CHANGELOG.md").read_text()
    for module in REMOVED_IN_0_3:
        with pytest.raises(ModuleNotFoundError):
            importlib.import_module(f"convnextv2_hf.{module}")
        assert f"`convnextv2_hf.{module}`" in changelog, module


def package_imports() -> dict[str, set[str]]:
    """Every module of the package and the package modules it imports, at the top or inside a function."""
    root = REPO / "src"
    modules = {".".join(p.relative_to(root).with_suffix("").parts).removesuffix(".__init__"): p
               for p in (root / "convnextv2_hf").rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        edges = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
                candidates = [base] + [f"{base}.{alias.name}" for alias in node.names]
            elif isinstance(node, ast.Import):
                candidates = [alias.name for alias in node.names]
            else:
                continue
            edges |= {c for c in candidates if c in modules and c != name}
        graph[name] = edges
    return graph


def test_no_import_cycles_between_modules():
    graph, state, cycles = package_imports(), {}, []

    def visit(module, path):
        state[module] = "open"
        for imported in sorted(graph[module]):
            if state.get(imported) == "open":
                cycles.append(path[path.index(imported):] + [imported])
            elif imported not in state:
                visit(imported, path + [imported])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert len(graph) > 40 and not cycles, cycles


def test_library_side_never_imports_the_training_toolkit():
    graph = package_imports()
    library = [m for m in graph if not m.startswith(("convnextv2_hf.training", "convnextv2_hf.demo", "convnextv2_hf.cli"))]
    leaks = {m: sorted(i for i in graph[m] if i.startswith("convnextv2_hf.training")) for m in library}
    assert not any(leaks.values()), leaks


CONVERT_AND_EXPORT = """
import json, sys
from convnextv2_hf.cli import main
folder, checkpoint, exported = sys.argv[1:4]
assert main(["convert", "--from", "reference", "--checkpoint", checkpoint, "--output_dir", folder]) == 0
assert main(["export", "--to", "timm", "--model_name_or_path", folder, "--output", exported]) == 0
print(json.dumps(sorted(m for m in sys.modules if m.split(".")[0] == "datasets" or m.startswith("convnextv2_hf.training"))))
"""


def test_converting_and_exporting_import_neither_the_training_toolkit_nor_datasets(tmp_path):
    import json

    from conftest import assert_ok, run_as_user
    from convnextv2_hf import ConvNextV2ForImageClassification
    from convnextv2_hf.convert_convnextv2 import export_checkpoint

    export_checkpoint(ConvNextV2ForImageClassification(tiny_config()), "reference", tmp_path / "ref.pth")
    result = run_as_user([sys.executable, "-c", CONVERT_AND_EXPORT, str(tmp_path / "hf"), str(tmp_path / "ref.pth"),
                          str(tmp_path / "timm.safetensors")], tmp_path, timeout=120)
    out = assert_ok(result)
    assert (tmp_path / "hf" / "README.md").is_file() and (tmp_path / "timm.safetensors").is_file()
    assert json.loads(result.stdout.strip().splitlines()[-1]) == [], out
