#!/usr/bin/env bash
# Build MinkowskiEngine 0.5.4 against the PyTorch of the active Python environment, cache the wheel, install it.
#
#   bash scripts/install_minkowski_engine.sh            # CPU build (CUDA build where nvcc and a CUDA torch exist)
#   MINKOWSKI_CACHE=/path bash scripts/...              # where built wheels are kept (default ~/.cache/convnextv2-hf)
#
# The PyPI sdist predates Python 3.10 and numpy 2: it is built in a separate virtual environment with numpy<2 and
# setuptools<60, with `from collections import Sequence` patched to `collections.abc`. numpy 2 works at run time.
# A CPU build takes about 9 minutes on 2 cores; later runs reuse the cached wheel.
set -euo pipefail

PYTHON=${PYTHON:-python}
CACHE=${MINKOWSKI_CACHE:-$HOME/.cache/convnextv2-hf/minkowski}
TORCH_VERSION=$("$PYTHON" -c "import torch; print(torch.__version__.replace('+', '_'))")
PY_TAG=$("$PYTHON" -c "import sys; print(f'cp{sys.version_info[0]}{sys.version_info[1]}')")
if command -v nvcc >/dev/null && "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.version.cuda else 1)"; then
    FLAVOUR=cuda
else
    FLAVOUR=cpu
fi
WHEEL_DIR="$CACHE/torch-$TORCH_VERSION-$PY_TAG-$FLAVOUR"

if "$PYTHON" -c "import MinkowskiEngine" 2>/dev/null; then
    echo "MinkowskiEngine already importable"
    exit 0
fi

if ! ls "$WHEEL_DIR"/MinkowskiEngine-*.whl >/dev/null 2>&1; then
    if ! dpkg -s libopenblas-dev >/dev/null 2>&1; then
        echo "installing libopenblas-dev"
        if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
        $SUDO apt-get update -qq && $SUDO apt-get install -y -qq libopenblas-dev >/dev/null
    fi
    WORK=$(mktemp -d)
    trap 'rm -rf "$WORK"' EXIT
    TORCH_SPEC=$("$PYTHON" -c "import torch; print('torch==' + torch.__version__.split('+')[0])")
    "$PYTHON" -m venv "$WORK/venv"
    "$WORK/venv/bin/pip" install -q "$TORCH_SPEC" "numpy<2" wheel ninja
    # torch declares setuptools>=77, but this sdist's build needs an old one: install it past the resolver.
    "$WORK/venv/bin/pip" install -q --no-deps "setuptools<60" 2>&1 | grep -v "dependency conflicts\|requires setuptools" || true
    "$WORK/venv/bin/pip" download -q --no-deps --no-binary :all: -d "$WORK" MinkowskiEngine==0.5.4
    tar -xzf "$WORK"/MinkowskiEngine-0.5.4.tar.gz -C "$WORK"
    SRC="$WORK/MinkowskiEngine-0.5.4"
    # `from collections import Sequence, namedtuple` -> abstract base classes from collections.abc, the rest kept
    "$WORK/venv/bin/python" - "$SRC" <<'PY'
import collections.abc, pathlib, re, sys

def fix(match):
    indent, names = match.group(1), [n.strip() for n in match.group(2).split(",")]
    abc = [n for n in names if hasattr(collections.abc, n)]
    rest = [n for n in names if n not in abc]
    lines = [f"{indent}from collections import {', '.join(rest)}"] if rest else []
    lines += [f"{indent}from collections.abc import {', '.join(abc)}"] if abc else []
    return "\n".join(lines)

for path in pathlib.Path(sys.argv[1]).rglob("*.py"):
    text = path.read_text()
    fixed = re.sub(r"^([ \t]*)from collections import ([\w, ]+)$", fix, text, flags=re.M)
    if fixed != text:
        path.write_text(fixed)
        print("patched", path.name)
PY
    ARGS=(--blas=openblas)
    if [ "$FLAVOUR" = cpu ]; then ARGS+=(--cpu_only); fi
    echo "building MinkowskiEngine ($FLAVOUR, $TORCH_SPEC); this takes several minutes"
    (cd "$SRC" && MAX_JOBS=${MAX_JOBS:-$(nproc)} "$WORK/venv/bin/python" setup.py -q bdist_wheel "${ARGS[@]}" >"$WORK/build.log" 2>&1) \
        || { tail -40 "$WORK/build.log"; exit 1; }
    mkdir -p "$WHEEL_DIR"
    cp "$SRC"/dist/MinkowskiEngine-*.whl "$WHEEL_DIR"/
fi
"$PYTHON" -m pip install -q --no-deps "$WHEEL_DIR"/MinkowskiEngine-*.whl
"$PYTHON" -c "import MinkowskiEngine as ME; print('MinkowskiEngine', ME.__version__, 'installed')"
