# The same install CI runs (scripts/setup.sh: a venv with `pip install -e .[dev]`, torch pinned
# to the 2.13.0 CPU build), then the service on embedded defaults. GPU extras are opt-in:
#   docker build --build-arg EXTRAS=dev,gpu .
FROM python:3.11-slim

RUN apt-get update \
    && apt-get install -y --no-install-recommends build-essential libgl1 libglib2.0-0 \
    && rm -rf /var/lib/apt/lists/*

ARG EXTRAS=dev
ENV ADVPLUGIN_EXTRAS=${EXTRAS}
WORKDIR /app
COPY . /app
RUN ./scripts/setup.sh

ENV ADVPLUGIN_DATA_DIR=/data
# Sealed storage: the master key lives on its own volume (or mount a secret there, or set
# ADVPLUGIN_MASTER_KEY), never in /data, so a copy of the data volume opens nothing.
ENV ADVPLUGIN_MASTER_KEY_FILE=/keys/master.key
VOLUME ["/data", "/keys"]
EXPOSE 8000
CMD [".venv/bin/advplugin", "serve", "--host", "0.0.0.0", "--port", "8000"]
