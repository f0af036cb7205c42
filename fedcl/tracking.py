"""MLflow tracking: the only module of fedcl that imports mlflow.

One MLflow run per simulation. Params: the whole config (strategy parameters as
``strategy_params.<name>``). Metrics per round (step = round over the run): ``acc_task_<j>``,
``avg_acc``, ``min_acc``, ``wc_acc``, ``train_loss``, ``round_seconds``, ``clients``,
``failures``, ``rejected``. At the end: ``acc``, ``forgetting``, ``forgetting_at_task_end``,
``bwt``, ``fwt``, ``wall_time_s``. Artifacts: config.toml, summary.json, accuracy_matrix.csv,
accuracy_matrix.png and accuracy_per_round.png. Tags: ``fedcl.strategy``, ``fedcl.scenario``,
``fedcl.dataset``.

The client is used directly (no fluent API, no global active run), so the tracker is safe to use
from the ServerApp's thread.
"""

from __future__ import annotations

import logging
import math
import time
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from fedcl.errors import FedclError
from fedcl.results import RoundRecord

FINAL_METRICS = ("acc", "forgetting", "forgetting_at_task_end", "bwt", "fwt", "wall_time_s")


def _client(tracking_uri: str) -> Any:
    # MLflow's sqlite store announces its table creation at INFO and trips a SQLAlchemy
    # deprecation notice of its own; neither is the user's business.
    logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)
    logging.getLogger("alembic").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=r"The ``noload`` loader strategy is deprecated")
    from mlflow.tracking import MlflowClient

    # no mlflow.set_tracking_uri(): it also sets $MLFLOW_TRACKING_URI for every process
    # started afterwards, which would steer their runs into this store
    return MlflowClient(tracking_uri=tracking_uri)


def flatten_params(config: dict[str, Any]) -> dict[str, str]:
    out: dict[str, str] = {}
    for key, value in config.items():
        if isinstance(value, dict):
            for sub, item in value.items():
                out[f"{key}.{sub}"] = str(item)
        else:
            out[key] = "" if value is None else str(value)
    return out


class Tracker:
    """Logs one fedcl run to MLflow."""

    def __init__(self, tracking_uri: str, experiment: str, run_name: str) -> None:
        self.tracking_uri = tracking_uri
        self.experiment = experiment
        self.run_name = run_name
        self.run_id: str | None = None
        self._client: Any = None

    def start(self, config: dict[str, Any]) -> str:
        from mlflow.entities import Param, RunTag

        try:
            client = _client(self.tracking_uri)
            exp = client.get_experiment_by_name(self.experiment)
            if exp is None:
                exp_id = client.create_experiment(self.experiment)
            elif exp.lifecycle_stage == "deleted":
                raise FedclError(f"MLflow experiment '{self.experiment}' is deleted; "
                                 "restore it or choose another name")
            else:
                exp_id = exp.experiment_id
            tags = {"fedcl.strategy": config["strategy"], "fedcl.scenario": config["scenario"],
                    "fedcl.dataset": config["dataset"], "mlflow.runName": self.run_name}
            run = client.create_run(exp_id, run_name=self.run_name, tags=tags)
        except FedclError:
            raise
        except Exception as err:
            raise FedclError(f"cannot use MLflow tracking URI '{self.tracking_uri}': "
                             f"{str(err).splitlines()[0] if str(err) else type(err).__name__}"
                             ) from None
        self._client = client
        self.run_id = run.info.run_id
        params = [Param(k, v[:6000]) for k, v in flatten_params(config).items()]
        for i in range(0, len(params), 100):
            client.log_batch(self.run_id, params=params[i:i + 100],
                             tags=[RunTag("fedcl.status", "running")] if i == 0 else [])
        return self.run_id

    def resume(self, run_id: str) -> str:
        """Continue logging into an existing run (``fedcl simulate --resume``)."""
        try:
            client = _client(self.tracking_uri)
            run = client.get_run(run_id)
        except Exception:
            raise FedclError(f"cannot resume: MLflow run {run_id} not found at "
                             f"{self.tracking_uri}") from None
        client.update_run(run_id, status="RUNNING")
        client.set_tag(run_id, "fedcl.status", "running")
        client.set_tag(run_id, "fedcl.resumed", "true")
        self._client, self.run_id = client, run.info.run_id
        return run_id

    def _log_metrics(self, values: dict[str, float | None], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step) for k, v in values.items()
                 if v is not None and math.isfinite(float(v))]
        if batch:
            self._client.log_batch(self.run_id, metrics=batch)

    def log_round(self, record: RoundRecord) -> None:
        values: dict[str, float | None] = {
            f"acc_task_{j}": a for j, a in enumerate(record.acc_per_task)}
        values.update(avg_acc=record.avg_acc, min_acc=record.min_acc, wc_acc=record.wc_acc,
                      train_loss=record.train_loss, round_seconds=record.seconds,
                      clients=record.clients, failures=record.failures,
                      rejected=record.rejected, task=record.task)
        self._log_metrics(values, step=record.round)

    def log_metrics(self, values: dict[str, float | None], step: int = 0) -> None:
        self._log_metrics(values, step)

    def finish(self, summary: dict[str, Any], files: Iterable[Path]) -> None:
        self._log_metrics({k: summary.get(k) for k in FINAL_METRICS}, step=0)
        for path in files:
            self._client.log_artifact(self.run_id, str(path))
        self._client.set_tag(self.run_id, "fedcl.status", "finished")
        self._client.set_terminated(self.run_id, "FINISHED")

    def fail(self, reason: str, status: str = "FAILED") -> None:
        """Mark the run FAILED (or KILLED), keeping everything logged so far."""
        if self.run_id is None or self._client is None:
            return
        try:
            self._client.set_tag(self.run_id, "fedcl.error", reason[:5000])
            self._client.set_tag(self.run_id, "fedcl.status", status.lower())
            self._client.set_terminated(self.run_id, status)
        except Exception:
            pass


def terminate_run(tracking_uri: str, run_id: str, status: str = "FAILED") -> None:
    """Mark a run as ended from outside the ServerApp (the CLI after Ctrl-C)."""
    client = _client(tracking_uri)
    if client.get_run(run_id).info.status == "RUNNING":
        client.set_terminated(run_id, status)


def run_status(tracking_uri: str, run_id: str) -> str:
    return str(_client(tracking_uri).get_run(run_id).info.status)


def fetch_runs(tracking_uri: str, experiment: str) -> list[dict[str, Any]]:
    """Every run of ``experiment``, newest first, as plain dicts (params, metrics, tags)."""
    client = _client(tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        raise FedclError(f"no MLflow experiment named '{experiment}' at {tracking_uri}")
    runs = client.search_runs([exp.experiment_id], order_by=["attributes.start_time DESC"],
                              max_results=10000)
    out = []
    for run in runs:
        out.append({
            "run_id": run.info.run_id,
            "run_name": run.info.run_name,
            "status": run.info.status,
            "start_time": run.info.start_time,
            "params": dict(run.data.params),
            "metrics": dict(run.data.metrics),
            "tags": {k: v for k, v in run.data.tags.items() if not k.startswith("mlflow.")},
        })
    return out


def metric_history(tracking_uri: str, run_id: str, key: str) -> list[tuple[int, float]]:
    """(step, value) pairs of one metric of one run, by step."""
    client = _client(tracking_uri)
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))
