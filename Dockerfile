# jetmoe-serve image: the server installed without dev tools in /opt/venv, running as a non-root user.
#   docker build -t jetmoe-serve .                                                # CUDA, PyTorch's -devel image
#   docker build -t jetmoe-serve:cpu --build-arg BASE_IMAGE=python:3.11-slim .   # slim CPU image, CPU torch wheel
#   docker run --gpus all -p 8000:8000 -v /path/to/jetmoe-8b:/model jetmoe-serve --model /model   # GPU, real model
#   docker run -p 8000:8000 jetmoe-serve:cpu                                                     # CPU, bundled model
# Offline: `scripts/docker_wheelhouse.sh` fills wheelhouse/ and the build installs from it with --no-index.
# Behind a TLS-intercepting proxy: `--secret id=pip_ca,src=PROXY_CA.pem` (trusted by pip during the build only).
# Needs BuildKit (the default builder since Docker 23; DOCKER_BUILDKIT=1 on Docker 20.10).

# 2.9: torch._grouped_mm (sm_90 fast path) and Triton 3.5. The -devel variant carries gcc and the C headers
# Triton needs to compile its kernel launchers at run time (the -runtime variant has no C compiler).
ARG BASE_IMAGE=pytorch/pytorch:2.9.0-cuda12.8-cudnn9-devel
FROM ${BASE_IMAGE}

# Installed only when the base image has no torch (python:3.11-slim and the like): the CPU wheel.
ARG TORCH_SPEC=torch==2.9.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HUB_OFFLINE=1 \
    PATH=/opt/venv/bin:$PATH \
    JETMOE_HOST=0.0.0.0 \
    JETMOE_PORT=8000

# Files of the build context are mounted, not copied: neither the sources nor the wheelhouse nor the CA bundle
# end up in a layer, only what pip installs. The venv sees the base image's packages, so a base's torch is kept.
# First the dependencies (versions from pyproject.toml, the wheelhouse and TORCH_SPEC), a layer that stays
# cached until one of those changes; pip reaches no index when wheelhouse/ holds wheels.
# hadolint ignore=DL3013
RUN --mount=type=bind,source=pyproject.toml,target=/src/pyproject.toml \
    --mount=type=bind,source=wheelhouse,target=/src/wheelhouse \
    --mount=type=secret,id=pip_ca \
    set -eu; \
    if [ -s /run/secrets/pip_ca ]; then \
        cat /etc/ssl/certs/ca-certificates.crt /run/secrets/pip_ca > /tmp/pip-ca.pem 2> /dev/null \
            || cp /run/secrets/pip_ca /tmp/pip-ca.pem; \
        export PIP_CERT=/tmp/pip-ca.pem; \
    fi; \
    if ls /src/wheelhouse/*.whl > /dev/null 2>&1; then export PIP_NO_INDEX=1 PIP_FIND_LINKS=/src/wheelhouse; fi; \
    python3 -m venv --system-site-packages /opt/venv; \
    if ! python -c "import torch" 2> /dev/null; then \
        pip install --no-cache-dir ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} "$TORCH_SPEC"; \
    fi; \
    python -c "import importlib, sys; toml = importlib.import_module('tomllib' if sys.version_info >= (3, 11) \
        else 'pip._vendor.tomli'); p = toml.load(open('/src/pyproject.toml', 'rb')); \
        print('\n'.join(p['build-system']['requires'] + p['project']['dependencies']))" > /tmp/requirements.txt; \
    pip install --no-cache-dir --requirement /tmp/requirements.txt; \
    rm -f /tmp/pip-ca.pem /tmp/requirements.txt

# Then the project itself, offline: its build backend was installed above.
RUN --mount=type=bind,target=/src,rw \
    pip install --no-cache-dir --no-deps --no-build-isolation --no-index /src \
    && python -c "import shutil, sys, torch; sys.exit(torch.version.cuda and not shutil.which('cc') \
        and not shutil.which('gcc') and 'CUDA torch without a C compiler: Triton cannot build its launchers')" \
    && useradd --create-home --uid 10001 --user-group --shell /usr/sbin/nologin jetmoe

USER 10001:10001
WORKDIR /home/jetmoe
EXPOSE 8000
# SIGTERM drains in-flight requests for up to --drain-timeout (30 s): stop with `docker stop -t 40`.
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=30s --timeout=5s --start-period=300s --retries=3 \
    CMD ["python", "-c", "import os, sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('JETMOE_PORT', '8000'), timeout=4).status != 200)"]
ENTRYPOINT ["jetmoe-serve"]
# Host and port come from JETMOE_HOST and JETMOE_PORT (the health check reads JETMOE_PORT too).
CMD []
