# The image the k8s manifests run: Ray's own image plus kinoray.
#   CUDA (Ray's -gpu image; its torch is kept):
#     docker build -t ghcr.io/kinoray/kinoray:0.1.0-cuda .
#   CPU (Ray's CPU image, torch's CPU build; the cpu-demo overlay):
#     docker build --build-arg BASE=rayproject/ray:2.60.0-py311-cpu \
#       --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cpu -t ghcr.io/kinoray/kinoray:0.1.0-cpu .
ARG BASE=rayproject/ray:2.60.0-py311-gpu
FROM ${BASE}
ARG TORCH_INDEX=
WORKDIR /home/ray/kinoray
# PyPI's Linux torch is the CUDA build: a CPU image names torch's CPU index instead.
RUN if [ -n "$TORCH_INDEX" ]; then pip install --no-cache-dir 'torch==2.13.0' --index-url "$TORCH_INDEX"; fi
COPY --chown=ray pyproject.toml README.md ./
COPY --chown=ray kinoray kinoray
COPY --chown=ray models models
COPY --chown=ray pipelines pipelines
COPY --chown=ray deployments deployments
# torch comes from the base image or the step above; pip keeps it when the pin matches.
RUN pip install --no-cache-dir .
ENV RAY_DATA_DISABLE_PROGRESS_BARS=1
