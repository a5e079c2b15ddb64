# The model worker on Inferentia2. AWS's Neuron deep learning container brings the Neuron SDK
# 2.26.1 (torch-neuronx 2.8, neuronx-cc 2.21, neuronx-distributed 0.15, Python 3.11), the
# release optimum-neuron 0.4.5 is built against; this image adds the package on top.
# Build and run it on an inf2 host (the Neuron driver lives on the host, not in the image).
FROM public.ecr.aws/neuron/pytorch-inference-neuronx:2.8.0-neuronx-py311-sdk2.26.1-ubuntu22.04

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app
COPY pyproject.toml README.md chatbot.py slack_manifest.yaml ./
COPY contract ./contract
COPY service ./service
COPY engine ./engine
COPY bot ./bot

# The SDK's own packages are pinned to the versions in the image, so that installing the
# package can never swap them for other builds; the import check fails the build, not the worker.
RUN pip freeze | grep -iE '^(torch|torchvision|torch[-_]neuronx|neuronx[-_]cc|neuronx[-_]distributed|libneuronxla|numpy)==' > /tmp/sdk-pins.txt \
 && pip install -c /tmp/sdk-pins.txt --extra-index-url https://pip.repos.neuron.amazonaws.com '.[neuron]' \
 && python -c "import neuronx_distributed, torch_neuronx, optimum.neuron" \
 && chatbot --help > /dev/null

# The base image's ENTRYPOINT (dockerd-entrypoint.py) would run the command as its child and then
# idle: `docker stop`'s SIGTERM would never reach the worker (no hand-back of its jobs), exit
# status 3 (model stuck: restart me) would reach Docker as 1, and a clean exit would leave the
# container running. Exec form makes `chatbot` the container's main process instead.
ENTRYPOINT ["chatbot"]
CMD ["worker"]
