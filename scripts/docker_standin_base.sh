#!/usr/bin/env bash
# Build a local stand-in for the Dockerfile's base image from Debian packages, for machines that reach Debian's
# package mirrors but no image registry (CI, air-gapped hosts). The result has Python 3.11, pip and venv:
#   scripts/docker_standin_base.sh [IMAGE]        # default jetmoe-standin-base:bookworm; no-op if it exists
#   docker build --build-arg BASE_IMAGE=jetmoe-standin-base:bookworm ...
# Needs root, debootstrap and a running Docker daemon. Set FORCE=1 to rebuild an existing image.
set -euo pipefail
IMAGE="${1:-jetmoe-standin-base:bookworm}"
SUITE="${SUITE:-bookworm}"
DOCKER="${DOCKER:-docker}"
if [ "${FORCE:-0}" != 1 ] && "$DOCKER" image inspect "$IMAGE" > /dev/null 2>&1; then
    echo "$IMAGE exists"
    exit 0
fi
ROOTFS="$(mktemp -d)"
trap 'rm -rf "$ROOTFS"' EXIT
debootstrap --variant=minbase --include=python3,python3-pip,python3-venv,ca-certificates \
    "$SUITE" "$ROOTFS" ${MIRROR:-} > "$ROOTFS.log" 2>&1 || { tail -20 "$ROOTFS.log"; exit 1; }
rm -f "$ROOTFS.log"
rm -rf "$ROOTFS"/var/cache/apt/archives/*.deb "$ROOTFS"/var/lib/apt/lists/*
tar -C "$ROOTFS" -c . | "$DOCKER" import \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'CMD ["/bin/bash"]' - "$IMAGE"
echo "built $IMAGE"
