# The SuperLink with fedcl installed: the SuperLink runs fedcl's ServerApp in a subprocess
# (Flower's default isolation), so the ServerApp's code and dependencies live in this image.
FROM flwr/superlink:1.42.0
USER root
RUN python -m pip install --no-cache-dir --index-url https://download.pytorch.org/whl/cpu \
        torch torchvision
COPY pyproject.toml README.md /app/fedcl/
COPY fedcl /app/fedcl/fedcl
COPY strategies /app/fedcl/strategies
RUN python -m pip install --no-cache-dir /app/fedcl
USER app
ENV FLWR_TELEMETRY_ENABLED=0 \
    FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1 \
    MLFLOW_DISABLE_TELEMETRY=true
# TLS and state come from the compose file (see docker/compose.yaml)
ENTRYPOINT ["flower-superlink", "--host", "0.0.0.0", "--port", "8000"]
