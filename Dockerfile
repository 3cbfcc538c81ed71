# syntax=docker/dockerfile:1
# GPU serving image. The model is MOUNTED, not baked in, so one image serves
# any checkpoint:
#   docker build -t cnn-service .
#   docker run --gpus all -p 3000:3000 -v "$PWD/runs/default:/model:ro" cnn-service
# (To bake a model in instead, `bentoml build && bentoml containerize cnn_service:latest`.)
FROM nvidia/cuda:13.0.1-cudnn-runtime-ubuntu24.04

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    BENTOML_HOME=/home/app/bentoml \
    BENTOML_DO_NOT_TRACK=True

# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv curl \
    && rm -rf /var/lib/apt/lists/*

RUN useradd --create-home --uid 10001 app
WORKDIR /app

# Dependencies first (pinned in requirements.txt), so code edits reuse this layer.
COPY requirements.txt ./
RUN python3 -m venv "$VIRTUAL_ENV" \
    && pip install --no-cache-dir -r requirements.txt

COPY pyproject.toml README.md bentofile.yaml ./
COPY model/ model/
COPY training/ training/
COPY service/ service/
COPY loadtests/ loadtests/
COPY testkit/ testkit/
RUN pip install --no-cache-dir --no-deps .

USER 10001
# ACCESS_LOG=json: one JSON line per request on stdout, for the platform's log collector
ENV CHECKPOINT_DIR=/model \
    DEVICE=auto \
    ACCESS_LOG=json
EXPOSE 3000
HEALTHCHECK --interval=15s --timeout=3s --start-period=90s --retries=3 \
    CMD ["curl", "-fsS", "http://127.0.0.1:3000/readyz"]
# 0.0.0.0 only here, inside the container; bare-metal serving defaults to 127.0.0.1.
CMD ["bentoml", "serve", ".", "--host", "0.0.0.0", "--port", "3000"]
