"""The one place that starts or attaches Ray and resolves the embedded defaults.

Local Ray is started in-process and bound to loopback through Ray's own settings, with
telemetry off (DESIGN.md §3). ``RAY_ADDRESS`` (or an explicit address) attaches to an existing
cluster instead, which is what ``ray job submit`` entrypoints do.

Nothing here touches proxies or any other part of the network environment: jobs must reach
real S3 and a real MLflow server, from the driver and from every Ray worker. Importing
``pipeline`` changes no environment variable at all.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"

# Ray's own settings for a local, private node, exported only when this process starts local
# Ray (the raylet and every worker inherit them). Ray evaluates the first one when ``ray`` is
# first imported: with it, every listener binds 127.0.0.1 instead of all interfaces.
LOCAL_RAY_ENV = {
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    # Telemetry off. It also turns off the only cloud-metadata probes Ray makes on a CPU/GPU
    # machine: Ray asks the AWS/GCP/Azure metadata addresses for its usage report only
    # (ray._common.usage.usage_lib.get_cloud_from_metadata_requests); the GCE probe in TPU
    # detection runs only where TPU devices exist and we pin TPU to 0 (see init_ray).
    "RAY_USAGE_STATS_ENABLED": "0",
    "MLFLOW_DISABLE_TELEMETRY": "true",
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


def workspace(root: str | os.PathLike | None = None) -> Workspace:
    """The working directory: explicit, else ``$REACTDIFF_HOME``, else ``./.reactdiff``."""
    path = Path(root or os.environ.get("REACTDIFF_HOME") or ".reactdiff").resolve()
    path.mkdir(parents=True, exist_ok=True)
    return Workspace(path)


def init_ray(address: str | None = None, *, num_cpus: int | None = None, num_gpus: int | None = None):
    """Start local Ray (loopback) or attach to ``address`` / ``$RAY_ADDRESS``. Idempotent.

    Attaching changes nothing in the environment: the cluster's nodes have their own settings
    (ray_cluster.yaml, infra/k8s) and must reach their peers, S3 and MLflow over the network.

    The console stays the job's own (:func:`quiet_ray`) unless logging is at DEBUG (``-v``).
    """
    address = address or os.environ.get("RAY_ADDRESS")
    if not address:
        # Before `import ray`: Ray reads RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER at import time.
        os.environ.update(LOCAL_RAY_ENV)
    import ray

    if ray.is_initialized():
        return ray.get_runtime_context()
    verbose = logging.getLogger().isEnabledFor(logging.DEBUG)
    if address:
        log.info("attaching to Ray cluster at %s", address)
        context = ray.init(address=address, log_to_driver=verbose, configure_logging=False)
    else:
        _force_loopback()
        _ask_for_token_auth()
        cpus = num_cpus or max(MIN_LOGICAL_CPUS, os.cpu_count() or 1)
        context = ray.init(
            num_cpus=cpus,
            num_gpus=num_gpus,
            # TPU: 0 skips Ray's TPU detection, which asks the GCE metadata server for the TPU
            # type on hosts that merely have /dev/vfio groups.
            resources={"TPU": 0},
            # The dashboard serves Ray's State API, which Ray Train's PlacementGroupCleaner polls
            # every second (it warns on each failed query without one). Loopback only, like every
            # other listener here; Ray picks the next free port when 8265 is taken.
            include_dashboard=True,
            dashboard_host=LOOPBACK,
            _node_ip_address=LOOPBACK,
            # Worker output (Ray Train/Data internals, execution plans, per-report lines) stays in
            # the session's log files; failures still reach the driver as exceptions.
            log_to_driver=verbose,
            configure_logging=False,
        )
    quiet_ray(verbose)
    logs = "each cluster node's /tmp/ray/session_latest/logs" if address else _link_ray_logs(context)
    dashboard = context.address_info.get("webui_url") if hasattr(context, "address_info") else None
    print(f"Ray: {'cluster ' + address if address else f'local on {LOOPBACK}'}"
          f"{', dashboard http://' + dashboard if dashboard else ''}; Ray logs in {logs}"
          f"{'' if verbose else ' (-v shows them here)'}", file=sys.stderr, flush=True)
    return context


def quiet_ray(verbose: bool = False) -> None:
    """Ray's driver-side chatter off the console unless ``verbose``: the ``ray`` loggers at
    WARNING (Ray Data's execution plans and Ray Train's reports are INFO) and Ray Data's own
    progress output off, since pipeline.progress shows one bar per step."""
    import ray.data
    from ray.util.debug import log_once

    level = logging.DEBUG if verbose else logging.WARNING
    logging.getLogger("ray").setLevel(level)
    for handler in logging.getLogger("ray.data").handlers:
        if not isinstance(handler, logging.FileHandler):     # its ray-data.log keeps everything
            handler.setLevel(level)
    ray.data.DataContext.get_current().enable_progress_bars = verbose
    if not verbose:
        # Ray Data warns once that its bars are off ("To enable, set ..."): they are off on
        # purpose, so that one-time notice is spent here (ray.data._internal.progress).
        log_once("ray_data_progress_manager_disabled")


def _link_ray_logs(context) -> str:
    """``<workspace>/logs/ray`` -> this Ray session's log folder (local Ray); the folder's path."""
    session = (getattr(context, "address_info", None) or {}).get("session_dir")
    if not session:
        return "the Ray session folder (/tmp/ray/session_latest/logs)"
    logs = os.path.join(session, "logs")
    link = workspace().root / "logs" / "ray"
    try:
        link.parent.mkdir(parents=True, exist_ok=True)
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(logs, target_is_directory=True)
        return str(link)
    except OSError:
        return logs


def _force_loopback() -> None:
    """Bind every listener to 127.0.0.1 even if Ray was imported before LOCAL_RAY_ENV was set.

    Ray evaluates RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER once, when ``ray`` is first imported, into
    ``ray._private.ray_constants.ENABLE_RAY_CLUSTER``; a job that imported Ray earlier would
    otherwise start a node whose agents listen on every interface. The constant is private,
    so its absence (a future Ray) is reported rather than assumed.
    """
    try:
        from ray._private import ray_constants
    except ImportError:  # pragma: no cover - depends on the Ray version
        ray_constants = None
    if ray_constants is None or not hasattr(ray_constants, "ENABLE_RAY_CLUSTER"):
        log.warning("this Ray has no ray_constants.ENABLE_RAY_CLUSTER; local Ray relies on "
                    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 being set before Ray was imported")
        return
    if ray_constants.ENABLE_RAY_CLUSTER:
        log.debug("Ray was imported before the loopback settings; forcing loopback")
        ray_constants.ENABLE_RAY_CLUSTER = False


def _ask_for_token_auth() -> None:
    """Token authentication for the new local cluster, asked for explicitly.

    With RAY_AUTH_MODE unset, Ray turns token auth on for a new local cluster (a token in
    ~/.ray/auth_token, made once) and warns on every start that it did. Setting the mode
    ourselves keeps exactly that protection without the warning; a mode the user chose
    (``disabled``, as the test suite does) is kept. Ray reads the mode into its config when
    ``ray`` is imported, so a Ray imported earlier is told again, as Ray itself does when it
    enables the default (ray._private.authentication.authentication_token_setup).
    """
    if os.environ.get("RAY_AUTH_MODE") is not None:
        return
    os.environ["RAY_AUTH_MODE"] = "token"
    try:
        from ray._raylet import Config
    except ImportError:  # pragma: no cover - depends on the Ray version
        return
    Config.initialize("")


def is_local_address(host: str) -> bool:
    """Whether ``host`` is a loopback address (IPv4 127/8, ::1 or IPv4-mapped 127/8)."""
    import ipaddress

    try:
        ip = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return host == "localhost"
    mapped = getattr(ip, "ipv4_mapped", None)
    return ip.is_loopback or bool(mapped and mapped.is_loopback)


def shutdown_ray() -> None:
    import ray

    if ray.is_initialized():
        ray.shutdown()


@contextlib.contextmanager
def remote_args_of_map_batches():
    """Ray 2.60 warns that ``map_batches(**ray_remote_args)`` goes away in 2.64, yet it is the
    only way to cap a task's retries or an actor's restarts; pyproject pins ray < 2.64 for it.
    Nothing for the user to act on, so that one warning is not shown."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`ray_remote_args` is deprecated")
        yield


def map_batches_without_restarts(ds, udf, **kwargs):
    """``ds.map_batches(udf, compute=ActorPoolStrategy(...), ...)`` for a step that a rerun repeats
    whole (latent-pair encoding, generating evaluation reactions): its actors are not restarted.

    Ray Data hands its actors their UDF as an object-store reference, and Ray cannot promise to
    restart such an actor (ray-project/ray#53727; it logs an error for every actor it starts).
    For these steps a lost actor then fails the step plainly, and running it again repeats it.
    """
    with remote_args_of_map_batches():
        return ds.map_batches(udf, max_restarts=0, **kwargs)
