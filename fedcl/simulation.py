"""``fedcl simulate``: the ServerApp and ClientApp under Flower's Ray simulation engine, in
process, with guards so that a failed backend, a crashing client or Ctrl-C ends the run with a
clear error instead of a hang, and no Ray process outlives the command.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

from fedcl.client_app import app as client_app
from fedcl.config import Config
from fedcl.errors import FedclError, RunAborted, RunCancelled
from fedcl.run_setup import check_output, default_run_name, make_output, output_folder
from fedcl.server_app import RunControl, RunObserver, build_server_app
from fedcl.tracking import terminate_run

# Seconds the driver waits for the ServerApp thread to wind down after a failure or Ctrl-C.
SHUTDOWN_GRACE_S = 30.0

# Defaults fedcl sets for the processes it starts, unless the user set them: telemetry off,
# and Ray's notice about accelerator variables silenced by choosing its future behaviour.
RUNTIME_ENV_DEFAULTS = {"FLWR_TELEMETRY_ENABLED": "0", "RAY_USAGE_STATS_ENABLED": "0",
                        "MLFLOW_DISABLE_TELEMETRY": "true",
                        "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0"}


def _route_flower_logs(log_file: Path | None, verbose: bool) -> None:
    """Flower's own log goes to ``log_file`` (its console output only with --verbose)."""
    logger = logging.getLogger("flwr")
    for handler in list(logger.handlers):
        if getattr(handler, "_fedcl", False):
            logger.removeHandler(handler)
            handler.close()
    if verbose:
        return
    for handler in list(logger.handlers):
        if isinstance(handler, logging.StreamHandler) and not isinstance(
                handler, logging.FileHandler):
            handler.setLevel(logging.CRITICAL + 1)
    if log_file is not None:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        fh = logging.FileHandler(log_file, encoding="utf-8")
        fh.setLevel(logging.DEBUG)
        fh.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        fh._fedcl = True  # type: ignore[attr-defined]
        logger.addHandler(fh)


def backend_config(config: Config) -> dict[str, Any]:
    return {
        "client_resources": {"num_cpus": config.client_cpus, "num_gpus": config.client_gpus},
        "init_args": {"logging_level": logging.ERROR, "log_to_driver": False,
                      "include_dashboard": False, "configure_logging": False},
    }


def simulate(config: Config, observer: RunObserver | None = None, verbose: bool = False,
             resume: dict[str, Any] | None = None) -> dict[str, Any]:
    """Run ``config`` under the Ray simulation engine (continuing the checkpoint ``resume``
    when given); returns the run's summary."""
    for key, value in RUNTIME_ENV_DEFAULTS.items():
        os.environ.setdefault(key, value)
    from flwr.simulation import run_simulation  # deferred: it imports Ray (~1 s)

    config.run_name = default_run_name(config)
    out_dir = output_folder(config, config.run_name)
    check_output(out_dir, resume=resume is not None)  # before flower.log goes there
    make_output(out_dir)
    config.output = str(out_dir)
    _route_flower_logs(out_dir / "flower.log", verbose)
    control = RunControl(observer=observer, resume=resume)
    server_app = build_server_app(config, control)
    crashed: BaseException | None = None
    saved_fds = None if verbose else _output_to(out_dir / "flower.log")
    interrupted = _stop_on_sigint(control)
    try:
        run_simulation(server_app=server_app, client_app=client_app,
                       num_supernodes=config.clients, backend_config=backend_config(config),
                       verbose_logging=verbose)
        if interrupted.is_set():  # the ServerApp saw the cancel and ended its run
            raise KeyboardInterrupt
    except KeyboardInterrupt:
        control.cancel.set()
        control.done.wait(SHUTDOWN_GRACE_S)
        _mark_failed(control, "interrupted (Ctrl-C)")
        raise
    except BaseException as err:  # the Ray backend failed to start or crashed
        crashed = err
    finally:
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, signal.default_int_handler)
        if crashed is not None:
            control.cancel.set()
        _shutdown_ray()
        _route_flower_logs(None, verbose=True)
        if saved_fds is not None:
            _restore_output(saved_fds)
    if crashed is not None:
        control.done.wait(SHUTDOWN_GRACE_S)
        if isinstance(control.error, FedclError) and not isinstance(control.error, RunCancelled):
            raise control.error
        cause = crashed
        while cause.__cause__ is not None:  # Flower wraps the backend's error twice
            cause = cause.__cause__
        _mark_failed(control, f"simulation backend failed: {cause}")
        raise RunAborted(f"simulation backend failed: {_first_line(cause)} "
                         f"(details in {out_dir / 'flower.log'})") from None
    control.done.wait(SHUTDOWN_GRACE_S)
    if control.error is not None:
        raise control.error
    if control.summary is None:
        raise RunAborted("the ServerApp ended without a result")
    return control.summary


def _output_to(path: Path) -> tuple[int, int]:
    """Send file descriptors 1 and 2 (where Ray's services and core print, past Python's
    logging) to ``path``; returns duplicates of the old ones for :func:`_restore_output`.
    The live display keeps its own duplicate of the terminal (``fedcl.cli``)."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = (os.dup(1), os.dup(2))
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    return saved


def _restore_output(saved: tuple[int, int]) -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    for target, fd in zip((1, 2), saved, strict=True):
        os.dup2(fd, target)
        os.close(fd)


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _stop_on_sigint(control: RunControl) -> threading.Event:
    """Ctrl-C asks the ServerApp to stop (it checks ``control.cancel`` while it waits for
    replies) instead of raising KeyboardInterrupt wherever the main thread happens to be: in
    Ray's or Flower's code, where it could be swallowed and the run go on. A second Ctrl-C
    raises KeyboardInterrupt at once. Returns the event that says Ctrl-C came."""
    interrupted = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        return interrupted

    def on_sigint(_signum: int, _frame: object) -> None:
        if interrupted.is_set():
            raise KeyboardInterrupt
        interrupted.set()
        control.cancel.set()

    signal.signal(signal.SIGINT, on_sigint)
    return interrupted


def _mark_failed(control: RunControl, reason: str) -> None:
    if control.run_id and control.tracking_uri:
        try:
            terminate_run(control.tracking_uri, control.run_id, "FAILED")
        except Exception:
            pass


def _shutdown_ray() -> None:
    try:
        import ray
    except ImportError:
        return
    if ray.is_initialized():
        ray.shutdown()
        time.sleep(0.1)
