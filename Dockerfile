# Open-vocabulary pre-segmentation backend for Label Studio.
#   docker build -t gkc-backend .                                                          # CPU
#   docker build --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128 -t gkc-backend:cuda .
# `docker compose up` (docker-compose.yml) runs it beside a Label Studio.
FROM python:3.11-slim

ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu

# CLIP weights are downloaded once into the volume (HF_HOME), not into each new container.
ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    NLTK_DATA=/opt/nltk_data \
    HF_HOME=/data/hf-cache \
    MODEL_DIR=/data/models \
    PORT=9090 THREADS=8

# WordNet from Debian, read by NLTK (see model/wordnet.py). The slim image drops man pages, so the
# one WordNet file NLTK needs beside the data (lexnames) is taken from the package itself.
# Debian's WordNet 3.0 packages do not change within a release: their versions are not pinned.
WORKDIR /tmp
# hadolint ignore=DL3008
RUN apt-get update && apt-get install -y --no-install-recommends wordnet-base wordnet-sense-index \
    && apt-get download wordnet-base && dpkg-deb -x wordnet-base_*.deb /tmp/wn \
    && mkdir -p /usr/share/man/man5 && cp /tmp/wn/usr/share/man/man5/lexnames.5WN.gz /usr/share/man/man5/ \
    && rm -rf /tmp/wn /tmp/*.deb /var/lib/apt/lists/*

WORKDIR /app
# Only what serving and training need: the demo's packages stay out (requirements.txt adds them).
COPY requirements-serve.txt requirements-openvino.txt ./
RUN pip install --index-url ${TORCH_INDEX} --extra-index-url https://pypi.org/simple -r requirements-serve.txt
# The image tower on CPUs (RUNTIME=auto): 1.6x torch bf16 on AMX (README, Speed). A GPU ignores it.
RUN pip install -r requirements-openvino.txt

COPY model model
COPY backend backend
COPY labeling_config labeling_config
RUN python -c "from model.wordnet import ensure_wordnet; ensure_wordnet()"

# An unprivileged user owns /data, so a new named volume mounted there is writable by it.
RUN useradd --uid 10001 --no-create-home --shell /usr/sbin/nologin gkc \
    && mkdir -p /data && chown gkc:gkc /data
USER 10001:10001
VOLUME /data

EXPOSE 9090
# Up and with a model that loaded (a model still loading is healthy; one that failed is not).
HEALTHCHECK --interval=30s --timeout=10s --start-period=600s --retries=3 CMD ["python", "-m", "backend", "health"]
CMD ["python", "-m", "backend"]
