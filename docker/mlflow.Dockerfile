# An MLflow tracking server (sqlite backend, artifacts served from a volume).
FROM python:3.11-slim
RUN python -m pip install --no-cache-dir "mlflow>=3.0"
ENV MLFLOW_DISABLE_TELEMETRY=true \
    MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false
VOLUME /mlflow
EXPOSE 5000
ENTRYPOINT ["mlflow", "server", "--host", "0.0.0.0", "--port", "5000", \
            "--backend-store-uri", "sqlite:////mlflow/mlflow.db", \
            "--artifacts-destination", "/mlflow/artifacts"]
