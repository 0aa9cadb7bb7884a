#!/usr/bin/env bash
# Wheels of the server's packages for the GPU machine (Python 3.12, manylinux x86_64, no network there):
# benchmarks/gpu/carried.txt and their dependencies, less what that machine already has, and
# benchmarks/gpu/carried-no-deps.txt without theirs. Run on a machine with
# network access; the GPU run installs them offline (pip --no-index --find-links, benchmarks/gpu/run_all.sh).
#   bash benchmarks/gpu/wheelhouse.sh [DIR]     (default benchmarks/gpu/wheelhouse, ignored by git)
set -euo pipefail
cd "$(dirname "$0")/../.."
DIR=${1:-benchmarks/gpu/wheelhouse}
PY=${PY:-python3}
LIMIT_MIB=64  # what travels with the working tree to the GPU machine, all files together
# Present there (GPU-machine inventory): httpx and its dependencies, tqdm, typing-extensions (torch's).
PRESENT=(httpx httpcore anyio h11 idna certifi tqdm typing_extensions)
rm -rf "$DIR" && mkdir -p "$DIR"
TARGET=(--only-binary=:all: --implementation cp --python-version 3.12 --abi cp312
        --platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64)
"$PY" -m pip download --quiet "${TARGET[@]}" -d "$DIR" -r benchmarks/gpu/carried.txt
"$PY" -m pip download --quiet --no-deps "${TARGET[@]}" -d "$DIR" -r benchmarks/gpu/carried-no-deps.txt
for name in "${PRESENT[@]}"; do
  rm -f "$DIR/$name"-*.whl
done
size_kib=$(du -sk "$DIR" | cut -f1)
ls -1 "$DIR"
echo "$(ls "$DIR" | wc -l) wheels, $((size_kib / 1024)) MiB in $DIR"
if (( size_kib > LIMIT_MIB * 1024 )); then
  echo "the wheelhouse is over ${LIMIT_MIB} MiB" >&2
  exit 1
fi
