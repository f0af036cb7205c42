"""The standard continual-learning baselines, federated, built on :mod:`fedcl.api` alone (as a
package outside fedcl would be): FedEWC (:mod:`.ewc`), FedLwF (:mod:`.lwf`), FedER and FedDER++
(:mod:`.replay`), their maths in :mod:`.maths`. fedcl names them as built-ins (``fedewc``,
``fedlwf``, ``feder``, ``fedderpp``) and imports a module only when a run asks for it."""
