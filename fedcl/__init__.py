"""fedcl: federated continual learning on Flower."""

import time as _time

#: ``time.monotonic()`` when this package was first imported: the earliest mark of a fedcl
#: program inside its process (:func:`fedcl.run_clock.RunClock.from_process_start`)
IMPORTED_AT = _time.monotonic()
