"""`evaluate` metric modules shipped inside the package, loadable offline by path."""

from pathlib import Path


def metric_path(name: str) -> str:
    """Path of a shipped metric module for `evaluate.load`, e.g. `metric_path("topk_accuracy")`."""
    path = Path(__file__).parent / name / f"{name}.py"
    if not path.exists():
        shipped = sorted(p.name for p in Path(__file__).parent.iterdir() if p.is_dir() and not p.name.startswith("_"))
        raise ValueError(f"No shipped metric {name!r}; available: {shipped}")
    return str(path)
