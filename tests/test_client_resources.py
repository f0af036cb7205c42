"""Whether a run's clients fit on a Ray node, checked before Flower builds its actor pool."""

from __future__ import annotations

import pytest

from fedcl.config import Config
from fedcl.errors import ConfigError
from fedcl.simulation import check_client_resources


def _node(cpus: float, gpus: float = 0.0, alive: bool = True) -> dict:
    resources = {"CPU": cpus, **({"GPU": gpus} if gpus else {})}
    return {"Alive": alive, "Resources": resources}


def test_a_client_that_fits_on_one_node_passes() -> None:
    check_client_resources(Config(client_cpus=2, client_gpus=0.0), [_node(2)])
    check_client_resources(Config(client_cpus=4, client_gpus=0.5), [_node(2), _node(8, 1)])


def test_a_client_that_fits_nowhere_is_one_line() -> None:
    with pytest.raises(ConfigError) as err:
        check_client_resources(Config(client_cpus=1, client_gpus=0.25), [_node(2)])
    assert str(err.value) == (
        "no client fits on this machine: each asks for 1 CPUs and 0.25 GPUs (client_cpus, "
        "client_gpus), the largest node has 2 CPUs and 0 GPUs; lower client_cpus or "
        "client_gpus")


def test_both_resources_must_fit_on_the_same_live_node() -> None:
    """CPUs on one node and the GPU on another do not make a place; a dead node's resources
    do not count; on a cluster the line names its address."""
    config = Config(client_cpus=8, client_gpus=1.0, ray_address="10.0.0.5:6379")
    nodes = [_node(16), _node(4, 1), _node(32, 2, alive=False)]
    with pytest.raises(ConfigError) as err:
        check_client_resources(config, nodes)
    assert str(err.value) == (
        "no client fits on any node of the Ray cluster at 10.0.0.5:6379: each asks for 8 CPUs "
        "and 1 GPUs (client_cpus, client_gpus), the largest node has 4 CPUs and 1 GPUs; lower "
        "client_cpus or client_gpus")
