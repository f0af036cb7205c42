"""The one place fedcl touches Flower's in-process simulation entry point,
``flwr.simulation.run_simulation``, which Flower 1.42 marks deprecated ("use `flwr run`").

``fedcl simulate`` needs four things of the engine that runs its ServerApp and ClientApps:

1. **Fractional client resources**: ``client_cpus`` and ``client_gpus`` are floats
   (``--client-gpus 0.1`` puts 10 client actors on one GPU; ``--client-cpus 0.5`` two on a
   core).
2. **An in-process start**: the ServerApp runs in fedcl's own process, so the live display
   (a :class:`~fedcl.server_app.RunObserver`), the run control (cancel on a signal, the
   summary handed back) and the output folder's lock are plain Python objects, and the
   command's exit status is the run's.
3. **fedcl's Ray**: fedcl starts Ray itself, from the engine's thread, with its processes
   shielded from the terminal's signals and Ray's failure-signal handler off in the driver
   (:mod:`fedcl.simulation`); Flower's backend uses a running Ray as it finds it.
4. **The config as an object**: a :class:`~fedcl.config.Config` given to the ServerApp
   directly (``run_simulation`` leaves ``context.run_config`` empty).

What Flower 1.42 offers instead, checked in its installed source:

* ``flwr run <app> <connection>`` with a local simulation connection (address ``:local:``)
  starts a detached SuperLink (``flwr.cli.run``, it outlives the command) that launches a
  ``flwr-simulation`` process per run (``flwr/simulation/app.py``,
  ``run_simulation_process``). That process pulls the app, the run config and the federation
  config over the SimulationIo/Runtime API (``SimulationIoConnection``,
  ``PullTaskInput``) and calls the same engine that ``run_simulation`` wraps
  (``_run_simulation``).
* Resources: the federation config is the ``SimulationConfig`` message
  (``flwr/proto/federation_config_pb2.pyi``), whose ``client_resources_num_cpus`` is an
  **integer** (``client_resources_num_gpus`` a float): fractional CPUs cannot be asked for,
  so need 1 is met for GPUs only.
* In-process start: none. The ServerApp and the ClientApps run in ``flwr-simulation``, a
  child of the SuperLink; nothing of the calling process reaches them but the run config
  (strings and numbers), so the live display, the run control and the lock held by the
  command (needs 2 and 4) would each need a channel of their own, and a signal to the command
  does not stop the run (``flwr stop`` does).
* Ray: ``flwr-simulation``'s backend calls ``ray.init`` itself with the init args the
  ``SimulationConfig`` carries (``num_cpus``, ``num_gpus``, ``logging_level``,
  ``log_to_driver``); there is no way to start Ray first in that process (need 3), and
  ``include_dashboard`` and the rest of fedcl's init args cannot be passed.

So the supported path serves fedcl's app as an app (the same ServerApp and ClientApp run
under ``flwr run``; README, "The same app under `flwr run`", tested in
``tests/test_flwr_run.py`` against a local SuperLink), but not ``fedcl simulate``, which keeps the
deprecated entry point until Flower offers an in-process one. The private ``_run_simulation``
underneath is not used: a deprecated public function is a smaller risk than a private one.
Should Flower remove ``run_simulation``, this module is the one to change
(``tests/test_architecture.py`` pins that no other module imports ``flwr.simulation``).

Tested with Flower 1.42.0 (and 1.41, which pip falls back to where 1.42's certifi pin cannot
be met: the two differ only in agent and tracing code); pyproject.toml allows
``flwr[simulation]>=1.41,<2``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

#: What runs a simulation: ``(server_app, client_app, num_supernodes, backend_config,
#: verbose)``; returns when the ServerApp has finished and the engine has stopped.
SimulationEngine = Callable[[Any, Any, int, dict[str, Any], bool], None]


def load_engine() -> SimulationEngine:
    """Flower's in-process simulation engine (importing it takes about a second: import Ray
    first where its import must be controlled, as :mod:`fedcl.simulation` does)."""
    from flwr.simulation import run_simulation

    def run(server_app: Any, client_app: Any, num_supernodes: int,
            backend_config: dict[str, Any], verbose: bool) -> None:
        run_simulation(server_app=server_app, client_app=client_app,
                       num_supernodes=num_supernodes, backend_config=backend_config,
                       verbose_logging=verbose)

    return run


__all__ = ["SimulationEngine", "load_engine"]
