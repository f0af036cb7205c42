"""A SuperExec that keeps fedcl's ClientApp warm on a SuperNode (``fedcl superexec``).

Flower runs each message's ClientApp in a fresh ``flwr-clientapp`` process, started by the
SuperExec that a SuperNode launches. That process imports Python, torch, Flower and fedcl
again for every message: seconds per round before any training (BENCHMARKS.md, "A real
federation against simulation"). With the SuperNode started with ``--isolation process`` (it
then launches no SuperExec of its own), ``fedcl superexec`` takes the SuperExec's place: it
imports torch, Flower and fedcl's ClientApp once, asks the SuperNode's Runtime API for tasks
like Flower's SuperExec does, and for each task forks a child of itself that runs Flower's own
ClientApp runtime (:func:`flwr.supernode.runtime.run_clientapp.run_clientapp`) with the task's
token. The child pulls the message and the context from the SuperNode, runs the ClientApp,
pushes the reply and exits, exactly as a ``flwr-clientapp`` process does; only the imports are
already done. Each message still gets a process of its own, so a failing or crashing ClientApp
cannot harm the next one, and the Context the SuperNode keeps is the only state that carries
over.

The parent touches neither CUDA nor torch's thread pools before it forks (children start
both themselves). It relies on Flower 1.42's SuperExec pieces (``RuntimeHttpClient``,
``BaseExecPlugin``, the ``Executor`` protocol); POSIX only (``os.fork``).
"""

from __future__ import annotations

import logging
import os
import signal
import time
from pathlib import Path
from types import FrameType

from flwr.proto.runtime_pb2 import AcquireTaskRequest  # pylint: disable=E0611
from flwr.supercore.constant import TaskType
from flwr.supercore.interceptors import RuntimeVersionHttpInterceptor
from flwr.supercore.retry import make_simple_http_retry_invoker
from flwr.supercore.runtime import RuntimeHttpClient
from flwr.supercore.superexec.executor import ExecutionSpec, LaunchResult
from flwr.supercore.superexec.plugin.base_exec_plugin import BaseExecPlugin

import fedcl.client_app  # noqa: F401  (imported once here, before the first fork)
from fedcl.errors import FedclError

log = logging.getLogger("fedcl")
#: Seconds between asks for a task (Flower's SuperExec waits 1 s by default).
POLL_S = 0.05


class ClientAppPlugin(BaseExecPlugin):
    """Flower's SuperExec plugin, for ClientApp tasks only."""

    supported_task_types = frozenset({TaskType.CLIENT_APP})


class ForkExecutor:
    """Flower's SuperExec ``Executor``, starting each task in a fork of this warm process."""

    def __init__(self, certificates: bytes | None) -> None:
        self.certificates = certificates
        self.children: set[int] = set()

    def get_eligible_capacity(self, supported_task_types: set[TaskType], *,
                              insecure: bool = False, root_certificates_path: str | None = None
                              ) -> tuple[set[TaskType], set[str]]:
        del insecure, root_certificates_path
        return supported_task_types, set()

    def wait_for_capacity(self, task_type: TaskType | None = None, *,
                          fab_hash: str | None = None, insecure: bool = False,
                          root_certificates_path: str | None = None) -> None:
        del task_type, fab_hash, insecure, root_certificates_path

    def launch(self, spec: ExecutionSpec) -> LaunchResult:
        try:
            pid = os.fork()
        except OSError as err:
            return LaunchResult.failed(f"fork failed: {err}")
        if pid == 0:  # the child: Flower's ClientApp runtime, then exit
            code = 1
            try:
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
                signal.signal(signal.SIGINT, signal.SIG_DFL)
                from flwr.supernode.runtime.run_clientapp import run_clientapp

                run_clientapp(spec.runtime_api_address, spec.token, spec.insecure,
                              self.certificates, parent_pid=spec.parent_pid,
                              runtime_dependency_install=spec.runtime_dependency_install)
                code = 0
            except SystemExit as done:  # Flower's runtime ends with sys.exit(code)
                code = done.code if isinstance(done.code, int) else 1
            finally:
                os._exit(code)
        self.children.add(pid)
        return LaunchResult.accepted()

    def reconcile(self) -> None:
        """Reap children that have exited."""
        for pid in list(self.children):
            try:
                done, _ = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                done = pid
            if done:
                self.children.discard(pid)

    def close(self) -> None:
        """Stop the children still running (the SuperExec is going away)."""
        for pid in self.children:
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 10
        while self.children and time.monotonic() < deadline:
            self.reconcile()
            time.sleep(0.05)
        for pid in self.children:
            try:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
            except (ProcessLookupError, ChildProcessError):
                pass
        self.children.clear()


def warm_up() -> None:
    """Import what every ClientApp message needs, before the first fork."""
    import flwr_datasets.partitioner  # noqa: F401  (3 s of the 5 s a fresh process imports)
    import torch  # noqa: F401
    from flwr.supernode.runtime import run_clientapp  # noqa: F401


def run_warm_superexec(runtime_api_address: str, *, insecure: bool,
                       root_certificates: str | None = None,
                       stop_after_s: float | None = None) -> None:
    """Serve the SuperNode at ``runtime_api_address`` until SIGTERM/SIGINT (or
    ``stop_after_s``)."""
    if not insecure and root_certificates is None:
        raise FedclError("give --insecure (a SuperNode's Runtime API on its own host) or "
                         "--root-certificates for a Runtime API served with TLS")
    certificates = None
    if root_certificates is not None:
        try:
            certificates = Path(root_certificates).read_bytes()
        except OSError as err:
            raise FedclError(f"cannot read --root-certificates {root_certificates}: "
                             f"{err.strerror or err}") from None
    warm_up()
    executor = ForkExecutor(certificates)
    client = RuntimeHttpClient.from_server_address(
        server_address=runtime_api_address, insecure=insecure, root_certificates=certificates,
        interceptors=[RuntimeVersionHttpInterceptor(component_name="SuperExec")],
        retry_invoker=make_simple_http_retry_invoker())
    plugin = ClientAppPlugin(runtime_api_address=runtime_api_address, insecure=insecure,
                             root_certificates_path=root_certificates,
                             runtime_dependency_install=False, executor=executor)
    stopping = False

    def stop(_signum: int, _frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    deadline = None if stop_after_s is None else time.monotonic() + stop_after_s
    try:
        while not stopping and (deadline is None or time.monotonic() < deadline):
            executor.reconcile()
            types, _ = executor.get_eligible_capacity(set(plugin.supported_task_types))
            res = client.AcquireTask(AcquireTaskRequest(supported_task_types=types,
                                                        agentapp_fab_hashes=set()))
            if res.HasField("task") and res.token:
                result = plugin.launch_task(token=res.token, task=res.task)
                if result.message:
                    log.warning("task %d not started: %s", res.task.task_id, result.message)
            else:
                time.sleep(POLL_S)
    finally:
        client.close()
        executor.close()


__all__ = ["ClientAppPlugin", "ForkExecutor", "run_warm_superexec"]
