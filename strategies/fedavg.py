"""FedAvg (McMahan et al., 2017): Flower's own strategy with fedcl's continual seams."""

from __future__ import annotations

from flwr.serverapp.strategy import FedAvg

from fedcl.config import Config
from fedcl.plugins import NoParams, register_strategy
from fedcl.strategy import Capabilities, ContinualStrategy


def flower_kwargs(config: Config) -> dict[str, object]:
    """Settings every fedcl strategy gives Flower's FedAvg family.

    fedcl's server loop samples the round's clients itself (one seeded stream, the same for every
    strategy) and hands Flower a grid that shows only those; Flower then takes all of them.
    Evaluation is central, on the server, so federated evaluation is off.
    """
    return {"fraction_train": 1.0, "fraction_evaluate": 0.0, "min_train_nodes": 1,
            "min_evaluate_nodes": 0, "min_available_nodes": 1}


class FedAvgCL(ContinualStrategy, FedAvg):
    """Flower's FedAvg, unchanged, with fedcl's continual hooks."""

    capabilities = Capabilities(fedavg_aggregate=True, cohort_mean=True, task_end_state=False)


@register_strategy("fedavg", "Federated averaging of client weights, weighted by sample "
                   "count (McMahan et al. 2017).", params=NoParams)
def build_fedavg(config: Config, params: NoParams) -> FedAvgCL:
    return FedAvgCL(**flower_kwargs(config))
