"""fedcl's public extension API in one import: what a package needs to bring its own method,
model, dataset or unlearning method (``docs/writing-a-method.md`` builds one end to end).

Server half of a strategy: :class:`ContinualStrategy` (the seams fedcl's task-stream driver
calls), :class:`Capabilities` (what it declares it supports), :class:`RoundInfo`,
:class:`StrategyWrapper`, :func:`flower_kwargs` (the settings fedcl gives a Flower strategy of
the FedAvg family), :func:`build_scenario` and :func:`build_model` (the run's task stream and
its model, as the server and every client build them: for a server half that runs the model
itself, such as TARGET's data synthesis). Client half: :class:`LocalTrainer` (one training
loop with hooks), :class:`RoundContext` (what each hook receives), :class:`TrainResult`,
:class:`ClientStore` (what a trainer keeps on its client between rounds) and
:class:`SampleBuffer` (raw samples in it, purged by fedcl on erasures), :class:`Scenario` (the
task stream), :func:`host_to_device` (a CPU tensor to the GPU with no wait for it, for what a
trainer copies every step). Registering:
:func:`register_strategy`, :func:`register_unlearning`, :func:`register_model`,
:func:`register_dataset`, :class:`NoParams`. The run's model and scenario as fedcl builds them,
for a server half that evaluates models itself (GLFC's proxy server): :func:`build_model`,
:func:`build_scenario`. Unlearning: :class:`UnlearningMethod`, :class:`UnlearningJob`,
:class:`ClientData` and :func:`operation` (the client half). Errors: :class:`ConfigError` (a bad
parameter: one line, exit 2). Wire keys: :mod:`fedcl.protocol`.
"""

from __future__ import annotations

from fedcl import protocol
from fedcl.client_ops import ClientData, operation
from fedcl.data.datasets import host_to_device
from fedcl.data.scenarios import Scenario
from fedcl.errors import ConfigError
from fedcl.plugins import (
    NoParams,
    build_model,
    build_scenario,
    register_dataset,
    register_model,
    register_strategy,
    register_unlearning,
)
from fedcl.strategy import (
    Capabilities,
    ContinualStrategy,
    RoundInfo,
    StrategyWrapper,
    flower_kwargs,
)
from fedcl.training import ClientStore, LocalTrainer, RoundContext, SampleBuffer, TrainResult
from fedcl.unlearning_api import UnlearningJob, UnlearningMethod

__all__ = [
    "Capabilities", "ClientData", "ClientStore", "ConfigError", "ContinualStrategy",
    "LocalTrainer", "NoParams", "RoundContext", "RoundInfo", "SampleBuffer", "Scenario",
    "StrategyWrapper", "TrainResult", "UnlearningJob", "UnlearningMethod", "build_model",
    "build_scenario", "flower_kwargs", "host_to_device", "operation", "protocol",
    "register_dataset", "register_model", "register_strategy", "register_unlearning",
]
