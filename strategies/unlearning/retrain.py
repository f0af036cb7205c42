"""retrain: the exact oracle (federated retraining from scratch; Liu et al., IWQoS 2021).

The run goes on from the model retrained from the initial weights without the erased data,
through every round so far with the same seeds and schedule: each round trains the clients it
sampled in the run minus the erased ones. The work itself is
:meth:`fedcl.erasure.Erasures.retrain`, which also judges every other method.
"""

from __future__ import annotations

from typing import Any

from fedcl.plugins import register_unlearning
from fedcl.unlearning_api import UnlearningMethod


class Retrain(UnlearningMethod):
    """Marker: the server's oracle is the method."""


@register_unlearning("retrain", "The exact oracle: retrain from the initial model without the "
                     "erased data, same seeds and schedule (each round's clients minus the "
                     "erased).")
def build_retrain(params: Any, out_dir: Any) -> Retrain:
    return Retrain(params, out_dir)
