"""Ray Train's torch process group, kept on loopback when Ray itself is local.

Ray Train's TorchTrainer starts the DDP rendezvous store (torch's TCPStore) on rank 0, and
that store listens on every interface (``*:<port>``) whatever ``MASTER_ADDR`` says; gloo and
NCCL pick the interface the host name resolves to. On a laptop that is an open port on the
local network for as long as training runs.

When the rank-0 worker's node address is a loopback address, Ray itself is local (every
worker must be on this host to reach that node), so here the store is created on a socket
bound to 127.0.0.1 (``TCPStore(master_listen_fd=...)``) and gloo/NCCL are pinned to the
loopback interface. On a real cluster (a routable node address) nothing changes: Ray's own
backend sets the process group up and workers reach each other over the network.
"""

from __future__ import annotations

import logging
import os
import socket
from datetime import timedelta

from ray.train.torch import TorchConfig

from pipeline.runtime import is_local_address

log = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"

# Ray's torch backend, reached through the public TorchConfig.backend_cls property (the class
# itself is private): everything but the loopback case is left to it.
_RayTorchBackend = TorchConfig().backend_cls

# rank 0's loopback store: it must outlive the call that created it (one per worker process).
_STORE = None


def loopback_interface() -> str:
    """The name of the interface holding 127.0.0.1 (``lo`` on Linux, ``lo0`` on macOS)."""
    import ray  # noqa: F401  (puts Ray's vendored psutil on sys.path)
    import psutil

    for name, addrs in psutil.net_if_addrs().items():
        if any(a.family == socket.AF_INET and a.address == LOOPBACK for a in addrs):
            return name
    return "lo"


def _node_is_local() -> bool:
    import ray

    return is_local_address(ray.util.get_node_ip_address())


def _serve_store(world_size: int, timeout_s: float) -> int:
    """On rank 0: a TCPStore server listening on 127.0.0.1 only. Returns its port."""
    global _STORE
    import torch.distributed as dist

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind((LOOPBACK, 0))
    sock.listen(max(128, world_size))
    port = sock.getsockname()[1]
    # The store takes over the listening socket; wait_for_workers=False because the other
    # ranks connect later, from _join_process_group.
    _STORE = dist.TCPStore(LOOPBACK, port, world_size, is_master=True, timeout=timedelta(seconds=timeout_s),
                           wait_for_workers=False, multi_tenant=True, master_listen_fd=sock.detach())
    return port


def _join_process_group(backend: str, rank: int, world_size: int, port: int, timeout_s: float) -> None:
    """On every rank: the torch process group through the loopback store, gloo/NCCL on lo."""
    import ray.train
    import torch.distributed as dist

    ctx = ray.train.get_context()
    iface = loopback_interface()
    # The same variables Ray's backend sets (torchrun's names), plus the interface pins.
    os.environ.update({
        "LOCAL_RANK": str(ctx.get_local_rank()), "LOCAL_WORLD_SIZE": str(ctx.get_local_world_size()),
        "NODE_RANK": str(ctx.get_node_rank()), "RANK": str(rank), "WORLD_SIZE": str(world_size),
        "MASTER_ADDR": LOOPBACK, "MASTER_PORT": str(port),
        "GLOO_SOCKET_IFNAME": iface, "NCCL_SOCKET_IFNAME": iface,
    })
    if "nccl" in backend:
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")   # fail instead of hanging
    timeout = timedelta(seconds=timeout_s)
    store = _STORE if rank == 0 else dist.TCPStore(LOOPBACK, port, world_size, is_master=False, timeout=timeout)
    dist.init_process_group(backend=backend, store=store, rank=rank, world_size=world_size, timeout=timeout)


class LoopbackTorchBackend(_RayTorchBackend):
    """Ray's torch backend, except that a local Ray gets a loopback-only process group."""

    def on_start(self, worker_group, backend_config):
        import ray

        if not worker_group.execute_single(0, _node_is_local):
            return super().on_start(worker_group, backend_config)
        backend = backend_config.backend
        if backend is None:
            backend = "nccl" if worker_group.get_resources_per_worker().get("GPU", 0) > 0 else "gloo"
        if backend not in ("gloo", "nccl"):
            return super().on_start(worker_group, backend_config)
        world_size = len(worker_group)
        port = worker_group.execute_single(0, _serve_store, world_size, backend_config.timeout_s)
        log.info("local Ray: torch process group (%s, %d workers) on %s:%d", backend, world_size, LOOPBACK, port)
        ray.get([worker_group.execute_single_async(rank, _join_process_group, backend, rank, world_size, port,
                                                   backend_config.timeout_s)
                 for rank in range(world_size)])


class LoopbackTorchConfig(TorchConfig):
    """``TorchConfig`` whose process group stays on 127.0.0.1 when Ray is local."""

    @property
    def backend_cls(self):
        return LoopbackTorchBackend
