# An MLflow tracking server: sqlite backend, artifacts served from the same volume.
FROM python:3.11-slim-bookworm
COPY docker/constraints.txt /tmp/constraints.txt
RUN python -m pip install --no-cache-dir -c /tmp/constraints.txt mlflow \
    && useradd --uid 49998 --no-create-home --home-dir /mlflow mlflow \
    # the folder the compose file mounts a named volume on: a new volume takes its owner
    && mkdir -p /mlflow && chown mlflow:mlflow /mlflow
USER mlflow
ENV MLFLOW_DISABLE_TELEMETRY=true \
    MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false
EXPOSE 5000
# --host 0.0.0.0 inside the container (the SuperLink's container reaches it as mlflow:5000);
# docker/compose.yaml publishes it on the host's 127.0.0.1 only. --allowed-hosts: MLflow
# answers 403 "Invalid Host header" to any Host it does not list, and its defaults list only
# localhost and private addresses, not the service name.
ENTRYPOINT ["mlflow", "server", "--host", "0.0.0.0", "--port", "5000", "--workers", "1", \
            "--allowed-hosts", "mlflow,mlflow:5000,localhost,localhost:5000,127.0.0.1,127.0.0.1:5000", \
            "--backend-store-uri", "sqlite:////mlflow/mlflow.db", \
            "--artifacts-destination", "/mlflow/artifacts"]
