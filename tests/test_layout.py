"""How the code is laid out: short functions, and a model side that checkpoints can carry."""

import ast
import sys

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


def test_old_training_paths_still_import_with_a_warning():
    import importlib
    import warnings

    moved = {"pretrain": "main", "finetune": "main", "data": "open_image", "transforms": "PretrainTransform",
             "optim": "param_groups", "plots": "save_curves", "model_card": "save_model_card"}
    for module, name in moved.items():
        sys.modules.pop(f"convnextv2_hf.{module}", None)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            old = importlib.import_module(f"convnextv2_hf.{module}")
        assert callable(getattr(old, name)), module
        assert any(issubclass(w.category, DeprecationWarning) and "training" in str(w.message) for w in caught), module
