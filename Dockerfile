# syntax=docker/dockerfile:1
# One image for every service: `search worker` (one GPU each) and `search dashboard`.
# PyPI's torch==2.14.1 (pinned in pyproject.toml) ships its CUDA libraries as wheels, so a
# slim Python base is enough; the host needs the NVIDIA driver and container toolkit.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app

# Dependencies first, from pyproject.toml alone, so that editing the code does not
# re-download torch: install with empty packages, then drop the placeholder project.
COPY pyproject.toml README.md ./
RUN mkdir search models augment \
    && touch search/__init__.py models/__init__.py augment/__init__.py \
    && pip install . \
    && pip uninstall -y fusion-search \
    && rm -rf search models augment build *.egg-info

COPY search/ search/
COPY models/ models/
COPY augment/ augment/
RUN pip install --no-deps . && rm -rf build *.egg-info

COPY studies/ studies/

# Run as a user; runs/ (SQLite, artifacts, data cache) and data/ are volumes in compose,
# and a fresh named volume takes the owner of the folder it is mounted over.
RUN useradd --create-home --uid 1000 search \
    && mkdir -p runs data \
    && chown search:search runs data
USER search

CMD ["search", "--help"]
