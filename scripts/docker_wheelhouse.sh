#!/usr/bin/env bash
# Download every wheel the image installs into wheelhouse/ (ignored by git, part of the build context), so that
# `docker build` installs with `pip --no-index` and needs no network or proxy certificate:
#   scripts/docker_wheelhouse.sh                 # CPU torch from PyTorch's CPU index, the rest from pip's index
#   TORCH_INDEX_URL= scripts/docker_wheelhouse.sh   # torch from wherever pip is configured to look
#   TORCH_SPEC=none scripts/docker_wheelhouse.sh    # no torch: the base image brings it (the CUDA image)
# Wheels are for the image's Python (IMAGE_PYTHON, default 3.11: the CUDA, slim and stand-in bases all have 3.11)
# on x86_64 Linux, whatever Python runs this script; further pip options go after `--`.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
DEST="${DEST:-wheelhouse}"
TORCH_SPEC="${TORCH_SPEC:-torch==2.9.0}"
TORCH_INDEX_URL="${TORCH_INDEX_URL-https://download.pytorch.org/whl/cpu}"
[ "${1:-}" = "--" ] && shift
TARGET=(--python-version "${IMAGE_PYTHON:-3.11}" --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64
        --only-binary=:all:)
PIP=("$PYTHON" -m pip --disable-pip-version-check download --dest "$DEST" --find-links "$DEST" "${TARGET[@]}" "$@")
mkdir -p "$DEST"
CONSTRAINTS="$(mktemp)"
trap 'rm -f "$CONSTRAINTS"' EXIT
if [ "$TORCH_SPEC" != none ]; then
    "${PIP[@]}" --no-deps ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} "$TORCH_SPEC"
    # Pin the wheel just fetched so that resolving the project's `torch>=` requirement cannot pick another build.
    "$PYTHON" - "$DEST" "$TORCH_SPEC" > "$CONSTRAINTS" <<'PY'
import pathlib, sys
try:
    from packaging.requirements import Requirement
    from packaging.utils import parse_wheel_filename
except ImportError:  # pip's own copy
    from pip._vendor.packaging.requirements import Requirement
    from pip._vendor.packaging.utils import parse_wheel_filename
spec = Requirement(sys.argv[2])
versions = [parse_wheel_filename(p.name)[1] for p in pathlib.Path(sys.argv[1]).glob("torch-*.whl")]
print(f"torch=={max(v for v in versions if spec.specifier.contains(v, prereleases=True))}")
PY
fi
# The build backend (pyproject's [build-system]) and the project's dependencies, torch's own included.
"${PIP[@]}" "setuptools>=68" wheel
"${PIP[@]}" --constraint "$CONSTRAINTS" .
rm -rf build ./*.egg-info
echo "wheelhouse: $(find "$DEST" -name '*.whl' | wc -l) wheels, $(du -sh "$DEST" | cut -f1)"
