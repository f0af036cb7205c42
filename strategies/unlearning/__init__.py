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
``ssd``, ``federaser``, ``projection``, ``gs-lora``, ``iau`` (whose training half is the
config field ``gradient_restriction``); see each module.
"""

from __future__ import annotations
