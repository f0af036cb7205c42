"""The standard continual-learning baselines, federated, built on :mod:`fedcl.api` alone (as a
package outside fedcl would be): FedEWC (:mod:`.ewc`), FedLwF (:mod:`.lwf`), FedER and FedDER++
(:mod:`.replay`), TARGET (:mod:`.target`), their maths in :mod:`.maths`; GLFC (:mod:`.glfc`, its
maths in :mod:`.glfc_maths`). fedcl names them as built-ins (``fedewc``, ``fedlwf``, ``feder``,
``fedderpp``, ``target``, ``glfc``) and imports a module only when a run asks for it."""
