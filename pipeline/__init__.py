"""Everything distributed or stateful: storage, REACT data, extraction, training, tracking."""

import os as _os

# Local runs must be hermetic (loopback-only Ray, no telemetry, no metadata probes) and Ray reads
# some of these variables at import time, so they are exported before any submodule imports Ray.
if "RAY_ADDRESS" not in _os.environ and _os.environ.get("REACTDIFF_HERMETIC", "1") != "0":
    from pipeline.runtime import apply_hermetic_env as _apply

    _apply()
