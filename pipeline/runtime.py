"""The one place that starts or attaches Ray and resolves the embedded defaults.

Local Ray is started in-process, loopback-only, without telemetry or cloud-metadata probes
(DESIGN.md §3). ``RAY_ADDRESS`` (or an explicit address) attaches to an existing cluster
instead, which is what ``ray job submit`` entrypoints do.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

# Set before Ray starts. Proxies pointing at a closed loopback port stop Ray's cloud-metadata
# probes; NO_PROXY keeps loopback traffic (moto, mlflow server, the Ray head) working.
HERMETIC_ENV = {
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",  # every Ray listener binds 127.0.0.1
    "RAY_USAGE_STATS_ENABLED": "0",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "HTTP_PROXY": "http://127.0.0.1:9",
    "HTTPS_PROXY": "http://127.0.0.1:9",
    "http_proxy": "http://127.0.0.1:9",
    "https_proxy": "http://127.0.0.1:9",
    "NO_PROXY": "127.0.0.1,localhost",
    "no_proxy": "127.0.0.1,localhost",
}

# With ray.init(num_cpus=2), a 2-worker TorchTrainer fed by read_parquet deadlocks: the train
# workers hold every CPU the Ray Data read tasks need. Logical CPUs are scheduling slots, not
# cores, so a laptop gets at least this many.
MIN_LOGICAL_CPUS = 4


@dataclass(frozen=True)
class Workspace:
    """Embedded defaults: one working directory holding data, snapshots, checkpoints, MLflow."""

    root: Path

    @property
    def data(self) -> str:
        return str(self.root / "data")

    @property
    def snapshots(self) -> str:
        return str(self.root / "snapshots")

    @property
    def checkpoints(self) -> str:
        return str(self.root / "checkpoints")

    @property
    def outputs(self) -> str:
        return str(self.root / "outputs")

    @property
    def mlflow_tracking_uri(self) -> str:
        return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{self.root / 'mlflow.db'}"

    @property
    def mlflow_artifact_location(self) -> str:
        return (self.root / "mlartifacts").resolve().as_uri()


def workspace(root: str | os.PathLike | None = None) -> Workspace:
    """The working directory: explicit, else ``$REACTDIFF_HOME``, else ``./.reactdiff``."""
    path = Path(root or os.environ.get("REACTDIFF_HOME") or ".reactdiff").resolve()
    path.mkdir(parents=True, exist_ok=True)
    return Workspace(path)


def apply_hermetic_env(*, override: bool = False) -> None:
    """Export the loopback/no-telemetry variables (kept if the caller already set them).

    Called when ``pipeline`` is imported (unless attaching to a cluster through ``RAY_ADDRESS``
    or opted out with ``REACTDIFF_HERMETIC=0``, e.g. to reach real S3 from a laptop through a
    proxy), so the variables are in place before anything imports Ray.
    """
    for key, value in HERMETIC_ENV.items():
        if override or key not in os.environ:
            os.environ[key] = value
    # In-process Ray exposes no job API (no dashboard), so token auth has nothing to guard;
    # a started head (`ray start --head`) uses token auth, see infra/local.
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")


def init_ray(address: str | None = None, *, num_cpus: int | None = None, num_gpus: int | None = None):
    """Start local Ray (loopback) or attach to ``address`` / ``$RAY_ADDRESS``. Idempotent."""
    address = address or os.environ.get("RAY_ADDRESS")
    if not address:
        apply_hermetic_env()  # before Ray is imported: it reads some variables at import time
    import ray

    if ray.is_initialized():
        return ray.get_runtime_context()
    if address:
        log.info("attaching to Ray cluster at %s", address)
        return ray.init(address=address, log_to_driver=True)
    _force_loopback(ray)
    cpus = num_cpus or max(MIN_LOGICAL_CPUS, os.cpu_count() or 1)
    log.info("starting local Ray on 127.0.0.1 with %d logical CPUs", cpus)
    return ray.init(
        num_cpus=cpus,
        num_gpus=num_gpus,
        include_dashboard=False,
        _node_ip_address="127.0.0.1",
        log_to_driver=True,
        configure_logging=False,
    )


def _force_loopback(ray) -> None:
    """Bind every listener to 127.0.0.1 even if Ray was imported before our variables were set.

    Ray evaluates RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER once, when ``ray`` is first imported; a job
    that imported Ray earlier would otherwise start a node listening on every interface.
    """
    from ray._private import ray_constants

    if ray_constants.ENABLE_RAY_CLUSTER:
        log.debug("Ray was imported before the loopback variables were set; forcing loopback")
        ray_constants.ENABLE_RAY_CLUSTER = False


def shutdown_ray() -> None:
    import ray

    if ray.is_initialized():
        ray.shutdown()
