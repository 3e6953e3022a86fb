# Open-vocabulary pre-segmentation backend for Label Studio.
#   docker build -t gkc-backend .                                  # CPU
#   docker build --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128 -t gkc-backend:cuda .
#   docker build --build-arg CLIP_MODEL=ViT-B-16 --build-arg CLIP_PRETRAINED=openai -t gkc-backend .  # bake weights in
FROM python:3.11-slim

ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ARG CLIP_MODEL=ViT-B-16
ARG CLIP_PRETRAINED=

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    NLTK_DATA=/opt/nltk_data \
    GKC_CACHE=/opt/gkc-cache \
    HF_HOME=/opt/hf \
    MODEL_DIR=/data/models \
    CLIP_MODEL=${CLIP_MODEL} \
    PORT=9090 THREADS=8

# WordNet from Debian, read by NLTK (see model/wordnet.py); man-db for the lexnames page.
RUN apt-get update && apt-get install -y --no-install-recommends wordnet-base wordnet-sense-index \
    && rm -rf /var/lib/apt/lists/*
# The slim image drops man pages; fetch the one WordNet file NLTK needs from the package itself.
RUN apt-get update && cd /tmp && apt-get download wordnet-base && dpkg-deb -x wordnet-base_*.deb /tmp/wn \
    && mkdir -p /usr/share/man/man5 && cp /tmp/wn/usr/share/man/man5/lexnames.5WN.gz /usr/share/man/man5/ \
    && rm -rf /tmp/wn /tmp/*.deb /var/lib/apt/lists/*

WORKDIR /app
COPY requirements.txt .
RUN pip install --index-url ${TORCH_INDEX} --extra-index-url https://pypi.org/simple -r requirements.txt

COPY backend backend
COPY model model
COPY demo demo
COPY labeling_config labeling_config
RUN python -c "from model.wordnet import ensure_wordnet; ensure_wordnet()" \
    && python -c "from demo.train_clip import materialize; materialize()"
# Download the CLIP weights at build time when a pretrained tag is given.
RUN if [ -n "${CLIP_PRETRAINED}" ]; then \
      python -c "import open_clip; open_clip.create_model('${CLIP_MODEL}', pretrained='${CLIP_PRETRAINED}')"; \
    fi
ENV CLIP_PRETRAINED=${CLIP_PRETRAINED:-openai}

EXPOSE 9090
CMD ["python", "-m", "backend"]
