"""Server strategies of fedcl, one module per method, registered by name.

Importing this package registers every strategy; ``strategies.registry`` looks them up.
"""

from strategies import fedavg, fedprox, fot, prd  # noqa: F401  (registration by import)
