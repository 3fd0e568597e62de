"""What the benchmarks share: a scratch folder with local Ray around one measurement."""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from typing import Iterator


@contextlib.contextmanager
def scratch(name: str) -> Iterator[str]:
    """A temporary folder for benchmark ``name``; removed afterwards, as is local Ray if the
    benchmark started it (a caller that brought its own Ray keeps it)."""
    import ray

    from pipeline import runtime

    work = tempfile.mkdtemp(prefix=f"reactdiff-bench-{name}-")
    started_ray = not ray.is_initialized()
    try:
        yield work
    finally:
        if started_ray:
            runtime.shutdown_ray()
        shutil.rmtree(work, ignore_errors=True)
