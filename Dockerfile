# medseg service image (CPU). Build: docker build -t medseg:0.1.0 .   (see docker-compose.yml)
# Not built in this repository's CI (no Docker there); the compose file is the reference set-up.
FROM python:3.11-slim

ENV PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1 \
    MEDSEG_SERVICE_DATA_DIR=/data
WORKDIR /opt/medseg

# the CPU build of the pinned PyTorch first, so pip never pulls a CUDA build
RUN pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu
COPY pyproject.toml README.md ./
COPY medseg ./medseg
COPY service ./service
RUN pip install ".[postgres,scale]" \
    && useradd --system --uid 10001 --home-dir /data medseg \
    && mkdir -p /data && chown medseg /data

USER medseg
VOLUME ["/data"]
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s \
    CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=4)"
# inside a container the service must listen on all interfaces: --public says so explicitly
ENTRYPOINT ["medseg", "serve", "--host", "0.0.0.0", "--public", "--port", "8000"]
