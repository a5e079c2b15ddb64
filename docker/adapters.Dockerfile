# The Discord and Slack adapters. They only talk to Redis: no torch, no model libraries.
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app
COPY pyproject.toml README.md chatbot.py slack_manifest.yaml ./
COPY contract ./contract
COPY service ./service
COPY engine ./engine
COPY bot ./bot

# The base requirements and the platform extras; none of them pulls torch. The checks fail the
# build if torch crept in or if the adapters' commands cannot start without it.
RUN pip install '.[discord,slack]' \
 && ! pip show torch > /dev/null 2>&1 \
 && chatbot --help > /dev/null

USER nobody
# As in worker.Dockerfile: `chatbot` is the main process (it gets docker stop's SIGTERM and its
# exit status is the container's); the command names the adapter.
ENTRYPOINT ["chatbot"]
CMD ["discord"]
