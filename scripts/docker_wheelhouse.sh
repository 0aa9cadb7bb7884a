#!/usr/bin/env bash
# Download every wheel the image installs into wheelhouse/ (ignored by git, part of the build context), so that
# `docker build` installs with `pip --no-index` and needs no network or proxy certificate:
#   scripts/docker_wheelhouse.sh                 # CPU torch from PyTorch's CPU index, the rest from pip's index
#   TORCH_INDEX_URL= scripts/docker_wheelhouse.sh   # torch from wherever pip is configured to look
# For the CUDA image, whose base brings torch, give the base's version (TORCH_SPEC=torch==2.9.0): the CPU wheel
# then only settles the other packages' torch requirement and the build keeps the base's torch.
# Wheels are for the image's Python (IMAGE_PYTHON, default 3.11: the CUDA, slim and stand-in bases all have 3.11)
# on x86_64 Linux, whatever Python runs this script; further pip options go after `--`.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
DEST="${DEST:-wheelhouse}"
TORCH_SPEC="${TORCH_SPEC:-torch==2.9.0}"  # pinned: torch==VERSION
TORCH_INDEX_URL="${TORCH_INDEX_URL-https://download.pytorch.org/whl/cpu}"
[ "${1:-}" = "--" ] && shift
TARGET=(--python-version "${IMAGE_PYTHON:-3.11}" --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64
        --only-binary=:all:)
PIP=("$PYTHON" -m pip --disable-pip-version-check download --dest "$DEST" --find-links "$DEST" "${TARGET[@]}" "$@")
mkdir -p "$DEST"
"${PIP[@]}" ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} "$TORCH_SPEC"
# Packages that depend on torch (xgrammar) must take that wheel, not PyPI's CUDA build of the same version: a
# pinned TORCH_SPEC as a constraint lets pip choose only among builds of that version, and a local build
# (2.9.0+cpu) ranks above the plain one.
CONSTRAINTS="$(mktemp)"
trap 'rm -f "$CONSTRAINTS"' EXIT
echo "$TORCH_SPEC" > "$CONSTRAINTS"
# The build backend (pyproject's [build-system]) and the project's dependencies except torch, fetched on its own
# above.
mapfile -t DEPS < <("$PYTHON" - <<'PY'
import pathlib, re
try:
    import tomllib
except ImportError:  # Python 3.10: pip's own copy
    from pip._vendor import tomli as tomllib
project = tomllib.loads(pathlib.Path("pyproject.toml").read_text())
for requirement in project["build-system"]["requires"] + project["project"]["dependencies"]:
    if not re.match(r"torch\b", requirement):
        print(requirement)
PY
)
"${PIP[@]}" --constraint "$CONSTRAINTS" "${DEPS[@]}"
echo "wheelhouse: $(find "$DEST" -name '*.whl' | wc -l) wheels, $(du -sh "$DEST" | cut -f1)"
