# The Discord and Slack adapters. They only talk to Redis: no torch, no model libraries.
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app
COPY pyproject.toml README.md chatbot.py ./
COPY engine ./engine
COPY bot ./bot

# Requirements come from pyproject.toml (base + discord + slack extras) minus accelerate, the one
# that pulls torch; the package itself then goes in without dependencies. The checks fail the
# build if torch crept in or if the adapters' commands cannot start without it.
RUN python -c "import tomllib; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; x = p['optional-dependencies']; print('\n'.join(d for d in p['dependencies'] + x['discord'] + x['slack'] if not d.startswith('accelerate')))" > /tmp/requirements.txt \
 && pip install -r /tmp/requirements.txt \
 && pip install --no-deps . \
 && ! pip show torch > /dev/null 2>&1 \
 && chatbot --help > /dev/null

USER nobody
CMD ["chatbot", "discord"]
