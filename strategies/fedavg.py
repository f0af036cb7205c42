"""FedAvg (McMahan et al., 2017): Flower's own strategy with fedcl's continual seams."""

from __future__ import annotations

from flwr.serverapp.strategy import FedAvg

from fedcl.config import Config
from fedcl.plugins import NoParams, register_strategy
from fedcl.strategy import Capabilities, ContinualStrategy, flower_kwargs


class FedAvgCL(ContinualStrategy, FedAvg):
    """Flower's FedAvg, unchanged, with fedcl's continual hooks."""

    capabilities = Capabilities(fedavg_aggregate=True, cohort_mean=True, task_end_state=False)


@register_strategy("fedavg", "Federated averaging of client weights, weighted by sample "
                   "count (McMahan et al. 2017).", params=NoParams)
def build_fedavg(config: Config, params: NoParams) -> FedAvgCL:
    return FedAvgCL(**flower_kwargs(config))
