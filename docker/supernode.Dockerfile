# A SuperNode with fedcl installed: each message runs fedcl's ClientApp here.
#
# Flower's Ubuntu-based image (glibc: PyTorch has wheels for it, not for the Alpine-based
# tags), the same Python as the SuperLink's image. Build with
# --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128 for CUDA clients.
ARG FLWR_VERSION=1.42.0
ARG PYTHON_VERSION=3.13
FROM flwr/supernode:${FLWR_VERSION}-py${PYTHON_VERSION}-ubuntu24.04
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
# installed and copied as Flower's user app (uid 49999), who owns /app and the environment
WORKDIR /app
COPY --chown=app:app docker/constraints.txt /app/fedcl/docker/constraints.txt
RUN python -m pip install --no-cache-dir --index-url ${TORCH_INDEX} \
        -c /app/fedcl/docker/constraints.txt torch torchvision
COPY --chown=app:app pyproject.toml README.md /app/fedcl/
COPY --chown=app:app fedcl /app/fedcl/fedcl
COPY --chown=app:app strategies /app/fedcl/strategies
RUN python -m pip install --no-cache-dir -c /app/fedcl/docker/constraints.txt /app/fedcl
ENV FLWR_TELEMETRY_ENABLED=0 \
    MLFLOW_DISABLE_TELEMETRY=true \
    OMP_NUM_THREADS=1
# the SuperLink address, TLS root certificate, key and node config come from the compose file
ENTRYPOINT ["flower-supernode"]
