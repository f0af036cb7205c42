"""Federated unlearning methods: how a run forgets an erasure request.

Each method registers itself by name through :func:`fedcl.plugins.register_unlearning`
(``--unlearning NAME``, config ``unlearning``) with its typed parameters
(``--unlearning-param KEY=VALUE``, TOML table ``[unlearning_params]``). A method
(:class:`fedcl.unlearning_api.UnlearningMethod`) gets an
:class:`~fedcl.unlearning_api.UnlearningJob` (the request, the global model, what is erased, the
clients and the grid) and returns the unlearned model, and optionally the training strategy to
go on with. Work on client data runs on the clients, as named operations of a QUERY message
(:mod:`fedcl.client_ops`).

Methods: ``retrain`` (the exact oracle, also what every other method is judged against),
``ssd``, ``federaser``, ``projection``, ``gs-lora``; see each module.

The names below are the registry's old ones, kept while callers move to :mod:`fedcl.plugins`.
"""

from __future__ import annotations

from fedcl.plugins import UnlearningSpec, get_unlearning, unlearning_names
from fedcl.plugins import build_unlearning as build
from fedcl.plugins import parse_unlearning_params as parse_params
from fedcl.plugins import register_unlearning as register

MethodEntry = UnlearningSpec
get = get_unlearning
names = unlearning_names

__all__ = ["MethodEntry", "build", "get", "names", "parse_params", "register"]
