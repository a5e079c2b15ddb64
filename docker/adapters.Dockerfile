# The Discord and Slack adapters. They only talk to Redis: no torch, no model libraries.
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app
COPY requirements/adapters.lock ./requirements/
# What the lock names and nothing else (hashes checked); the code installs on top without resolving.
RUN pip install --no-deps --require-hashes -r requirements/adapters.lock
COPY pyproject.toml README.md slack_manifest.yaml ./
COPY chatbot ./chatbot
COPY contract ./contract
COPY service ./service
COPY engine ./engine
COPY bot ./bot

# The lock holds the base requirements and the platform extras, none of which pulls torch. The
# checks fail the build if the lock misses a requirement, if torch crept in, or if the adapters'
# commands cannot start without it.
RUN pip install --no-deps . \
 && pip check \
 && ! pip show torch > /dev/null 2>&1 \
 && chatbot --help > /dev/null

USER nobody
# As in worker.Dockerfile: `chatbot` is the main process (it gets docker stop's SIGTERM and its
# exit status is the container's); the command names the adapter.
ENTRYPOINT ["chatbot"]
CMD ["discord"]
