# PCBM Studio: the web app and the `pcbm` CLI.
# Build: docker build -t pcbm-studio .   Run: see docker-compose.yml (app + PostgreSQL).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 \
    PCBM_WORKSPACE=/data HF_HUB_OFFLINE=1

RUN useradd --create-home --uid 1000 pcbm
WORKDIR /app

COPY pyproject.toml README.md ./
COPY ml ./ml
COPY app ./app
COPY templates ./templates
COPY static ./static
COPY migrations ./migrations
RUN pip install --upgrade pip && pip install . && mkdir -p /data && chown pcbm /data

USER pcbm
EXPOSE 8000
VOLUME ["/data"]
HEALTHCHECK --interval=30s --timeout=5s CMD python -c "import urllib.request,sys; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8000/healthz').status == 200 else 1)"
# Migrations run before the server starts; the server refuses an unmigrated database anyway.
# `exec` makes the server PID 1, so `docker stop` (SIGTERM) reaches it and in-flight requests finish.
CMD ["sh", "-c", "pcbm db upgrade && exec pcbm serve --host 0.0.0.0 --port 8000"]
