# The image the k8s manifests run: Ray's own image (CUDA build of torch included in -gpu tags)
# plus kinoray. Build: docker build -t ghcr.io/kinoray/kinoray:0.1.0-cuda .
ARG BASE=rayproject/ray:2.60.0-py311-gpu
FROM ${BASE}
WORKDIR /home/ray/kinoray
COPY --chown=ray pyproject.toml README.md ./
COPY --chown=ray kinoray kinoray
COPY --chown=ray models models
COPY --chown=ray pipelines pipelines
COPY --chown=ray deployments deployments
# torch comes from the base image; pip keeps it when the pin matches.
RUN pip install --no-cache-dir .
ENV RAY_DATA_DISABLE_PROGRESS_BARS=1
