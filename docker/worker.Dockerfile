# The model worker on Inferentia2. AWS's Neuron deep learning container brings the Neuron SDK
# 2.26.1 (torch-neuronx 2.8, neuronx-cc 2.21, neuronx-distributed 0.15, Python 3.11), the
# release optimum-neuron 0.4.5 is built against; this image adds the package on top.
# Build and run it on an inf2 host (the Neuron driver lives on the host, not in the image).
FROM public.ecr.aws/neuron/pytorch-inference-neuronx:2.8.0-neuronx-py311-sdk2.26.1-ubuntu22.04

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app
COPY requirements/neuron.lock ./requirements/
# What the image adds to the container, exactly as requirements/neuron.lock names it (hashes
# checked); the container's torch, Neuron SDK and numpy are left as they are.
RUN pip install --no-deps --require-hashes -r requirements/neuron.lock
COPY pyproject.toml README.md slack_manifest.yaml ./
COPY chatbot ./chatbot
COPY contract ./contract
COPY service ./service
COPY engine ./engine
COPY bot ./bot

# pip check fails the build if the lock and the container's own packages disagree, the import
# check if the SDK does not load beside them: the build fails, not the worker.
RUN pip install --no-deps . \
 && pip check \
 && python -c "import neuronx_distributed, torch_neuronx, optimum.neuron" \
 && chatbot --help > /dev/null

# The base image's ENTRYPOINT (dockerd-entrypoint.py) would run the command as its child and then
# idle: `docker stop`'s SIGTERM would never reach the worker (no hand-back of its jobs), exit
# status 3 (model stuck: restart me) would reach Docker as 1, and a clean exit would leave the
# container running. Exec form makes `chatbot` the container's main process instead.
ENTRYPOINT ["chatbot"]
CMD ["worker"]
