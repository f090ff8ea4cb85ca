# glm4serve image: the OpenAI-compatible server, serving the built-in demo model by default.
#
#   CPU (default, slim):  docker build -t glm4serve .
#   CUDA:                 docker build -t glm4serve:cuda \
#                           --build-arg TORCH_INDEX_URL=https://pypi.org/simple --build-arg TORCH_SPEC=torch==2.11.0 .
#                         (PyPI's torch 2.11.0 is its CUDA 13.0 build, the one the GPU check ran: NVIDIA
#                         driver >= 580; for an older driver, an older CUDA's index under
#                         https://download.pytorch.org/whl/, not run here)
#   Replicas on Ray:      add --build-arg EXTRAS=[ray] (deploy/k8s/rayservice.yaml runs such an image)
#   Run a real model:     docker run -p 8000:8000 -v /data/glm-4-9b-chat:/models/glm-4-9b-chat:ro \
#                           glm4serve --config configs/glm-4-9b-chat.yaml --model /models/glm-4-9b-chat
ARG BASE_IMAGE=python:3.11-slim
FROM ${BASE_IMAGE}

# PyPI's default torch wheel carries CUDA (GBs); the CPU index has a ~200 MB one. The index's newest
# torch by default. A base image's torch older than pyproject.toml's floor is replaced by
# `pip install .` below, from PyPI.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG TORCH_SPEC=torch
ARG EXTRAS=""
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1

RUN python -c "import torch" 2>/dev/null || pip install --index-url "${TORCH_INDEX_URL}" "${TORCH_SPEC}"
# A CUDA torch runs Triton kernels (paged decode attention, the compiled layers), and Triton builds
# their launchers with a C compiler on first use: the slim base and CUDA runtime images have none.
RUN if python -c "import sys, torch; sys.exit(0 if torch.version.cuda else 1)"; then \
      apt-get update && apt-get install -y --no-install-recommends gcc libc6-dev && rm -rf /var/lib/apt/lists/*; \
    fi

WORKDIR /app
# Package metadata and code first, configs last: editing a config does not reinstall.
COPY pyproject.toml README.md ./
COPY glm4serve ./glm4serve
RUN pip install ".${EXTRAS}" && rm -rf build *.egg-info
COPY configs ./configs

RUN useradd --create-home --uid 1000 glm4
USER glm4
# Bake the demo checkpoint (14 MB) into the image: the first `docker run` serves at once. The
# hub cache folder is made here so that a volume mounted on it belongs to this user.
RUN mkdir -p /home/glm4/.cache/huggingface \
 && python -c "from glm4serve.server import demo_model_dir; demo_model_dir()"

# Settings come from the config file given in CMD, then GLM4SERVE_* variables, then flags.
ENV GLM4SERVE_HOST=0.0.0.0 GLM4SERVE_PORT=8000
EXPOSE 8000
# Loading a 9B checkpoint takes minutes: /health answers 503 until the engine runs.
HEALTHCHECK --interval=30s --timeout=5s --start-period=600s --retries=3 \
  CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('GLM4SERVE_PORT', '8000'), timeout=4)"]
# SIGTERM (docker stop) drains: new requests get 503, in-flight ones finish, then exit 0.
# Give `docker stop -t` more than graceful_shutdown_seconds.
STOPSIGNAL SIGTERM
ENTRYPOINT ["glm4serve", "serve"]
CMD ["--config", "configs/demo.yaml"]
