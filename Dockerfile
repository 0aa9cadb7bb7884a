# jetmoe-serve image: CUDA-enabled PyTorch, the server installed without dev tools, running as a non-root user.
#   docker build -t jetmoe-serve .
#   docker run --gpus all -p 8000:8000 -v /path/to/jetmoe-8b:/model jetmoe-serve --model /model   # GPU, real model
#   docker run -p 8000:8000 jetmoe-serve                                                          # CPU, bundled model
# 2.9: torch._grouped_mm (sm_90 fast path) and Triton 3.5 for the fused kernels.
FROM pytorch/pytorch:2.9.0-cuda12.8-cudnn9-runtime

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HUB_OFFLINE=1 \
    JETMOE_HOST=0.0.0.0 \
    JETMOE_PORT=8000

WORKDIR /opt/jetmoe
COPY pyproject.toml README.md ./
COPY model ./model
COPY server ./server
# The base image's torch satisfies the dependency, so pip keeps it and installs only the rest.
RUN pip install --no-cache-dir . \
    && useradd --create-home --uid 10001 --shell /usr/sbin/nologin jetmoe

USER 10001:10001
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=300s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4).status != 200)"]
ENTRYPOINT ["jetmoe-serve"]
CMD ["--host", "0.0.0.0", "--port", "8000"]
