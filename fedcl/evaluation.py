"""Central evaluation: the global model's test accuracy on every task of the scenario."""

from __future__ import annotations

import torch
from flwr.app import ArrayRecord

from fedcl import plugins
from fedcl.config import Config
from fedcl.data.scenarios import Scenario
from fedcl.training import accuracy


class Evaluator:
    """Test accuracy of a set of global arrays on every task of the scenario.

    ``evaluator(arrays)`` -> one accuracy in [0, 1] per task (seen and unseen), on the first
    ``eval_samples_per_task`` test samples of each (all when 0). The test sets stay on
    ``device``; :attr:`model` is the run's model, reloaded with each call's arrays."""

    def __init__(self, scenario: Scenario, config: Config, device: torch.device) -> None:
        self.scenario = scenario
        self.device = device
        self.batch_size = config.eval_batch_size
        self.model = plugins.build_model(config, scenario).to(device)
        # test sets stay on the device: moved once, not after every round
        self.test = [tuple(v.to(device) for v in scenario.test_data(
            t, config.eval_samples_per_task, config.seed)) for t in range(len(scenario.tasks))]

    def __call__(self, arrays: ArrayRecord) -> list[float]:
        self.model.load_state_dict(arrays.to_torch_state_dict())
        ds = self.scenario.dataset
        return [accuracy(self.model, x, y, self.scenario.head_for(t), ds.mean, ds.std,
                         self.device, self.batch_size)
                for t, (x, y) in enumerate(self.test)]
