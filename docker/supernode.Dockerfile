# A SuperNode with fedcl installed: each training message runs fedcl's ClientApp here.
# Build with --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu124 for CUDA clients.
FROM flwr/supernode:1.42.0
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
USER root
RUN python -m pip install --no-cache-dir --index-url ${TORCH_INDEX} torch torchvision
COPY pyproject.toml README.md /app/fedcl/
COPY fedcl /app/fedcl/fedcl
COPY strategies /app/fedcl/strategies
RUN python -m pip install --no-cache-dir /app/fedcl
USER app
ENV FLWR_TELEMETRY_ENABLED=0 \
    MLFLOW_DISABLE_TELEMETRY=true
# the SuperLink address, TLS root certificate and node config come from the compose file
ENTRYPOINT ["flower-supernode"]
