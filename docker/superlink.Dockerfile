# The SuperLink with fedcl installed: it runs fedcl's ServerApp in a subprocess (Flower's
# default isolation), so the ServerApp's code and dependencies live in this image.
#
# Flower's Ubuntu-based image (glibc): PyTorch publishes no wheels for the Alpine-based
# (musl) tags such as flwr/superlink:1.42.0. Flower builds SuperLink images on Ubuntu 24.04
# for its latest supported Python only, 3.13 (tags <flwr>-py<python>-ubuntu24.04).
ARG FLWR_VERSION=1.42.0
ARG PYTHON_VERSION=3.13
FROM flwr/superlink:${FLWR_VERSION}-py${PYTHON_VERSION}-ubuntu24.04
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
# Flower's images run as the user app (uid 49999), who owns /app and the Python environment:
# everything is installed and copied as that user, nothing needs root.
WORKDIR /app
COPY --chown=app:app docker/constraints.txt /app/fedcl/docker/constraints.txt
RUN python -m pip install --no-cache-dir --index-url ${TORCH_INDEX} \
        -c /app/fedcl/docker/constraints.txt torch torchvision
COPY --chown=app:app pyproject.toml README.md /app/fedcl/
COPY --chown=app:app fedcl /app/fedcl/fedcl
COPY --chown=app:app strategies /app/fedcl/strategies
RUN python -m pip install --no-cache-dir -c /app/fedcl/docker/constraints.txt /app/fedcl \
    # the folders the compose file mounts named volumes on: a new volume takes their owner
    && mkdir -p /app/state /app/outputs
ENV FLWR_TELEMETRY_ENABLED=0 \
    FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1 \
    MLFLOW_DISABLE_TELEMETRY=true
# TLS, state and addresses come from the compose file (docker/compose.yaml). The ServerApp
# runs in /app: runs write their outputs to /app/outputs/<run name>.
ENTRYPOINT ["flower-superlink", "--port", "8000"]
