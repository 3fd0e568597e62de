"""The torch process group of Ray Train: on 127.0.0.1 when Ray is local, Ray's own setup otherwise."""

from __future__ import annotations

import json

import pytest

from pipeline.train import backend as torch_backend
from pipeline.runtime import is_local_address


@pytest.mark.parametrize("host,local", [
    ("127.0.0.1", True), ("127.0.0.3", True), ("::1", True), ("[::1]", True), ("::ffff:127.0.0.1", True),
    ("localhost", True), ("10.0.3.7", False), ("192.0.2.2", False), ("fd00::5", False), ("ray-head", False),
])
def test_loopback_addresses(host, local):
    assert is_local_address(host) is local


def test_a_local_two_worker_process_group_listens_on_loopback_only(ray_local, tmp_path):
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    def loop(config):   # nested: Ray ships it by value (this test module is not importable there)
        import json
        import os

        import psutil
        import ray.train
        import torch
        import torch.distributed as dist

        value = torch.tensor([float(dist.get_rank() + 1)])
        dist.all_reduce(value)                   # gloo really connects through the store
        listeners = sorted(f"{c.laddr.ip}:{c.laddr.port}" for c in psutil.Process().net_connections(kind="tcp")
                           if c.status == psutil.CONN_LISTEN)
        seen = {"sum": float(value), "backend": dist.get_backend(), "listeners": listeners,
                "gloo_ifname": os.environ.get("GLOO_SOCKET_IFNAME")}
        with open(os.path.join(config["out"], f"rank{dist.get_rank()}.json"), "w") as f:
            json.dump(seen, f)            # (Train V2 keeps metrics only with checkpoints)
        ray.train.report({"sum": float(value)})

    trainer = TorchTrainer(loop, train_loop_config={"out": str(tmp_path)}, scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 0.5}),
                           torch_config=torch_backend.LoopbackTorchConfig(),
                           run_config=RunConfig(name="loopback-pg", storage_path=str(tmp_path)))
    result = trainer.fit()
    assert result.error is None, result.error
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for seen in ranks:
        assert seen["sum"] == 3.0 and seen["backend"] == "gloo"
        assert all(is_local_address(addr.rsplit(":", 1)[0]) for addr in seen["listeners"]), seen["listeners"]
        assert seen["gloo_ifname"] == torch_backend.loopback_interface()
    # rank 0 hosts the rendezvous store: it listens, on loopback (checked above)
    assert ranks[0]["listeners"], "rank 0 listens nowhere: the store was not created there"


class _FakeGroup:
    """The worker-group calls the backend makes; rank 0 reports a routable node address."""

    def __init__(self, local: bool):
        self.local, self.calls = local, []

    def execute_single(self, rank, fn, *args):
        self.calls.append(fn.__name__)
        assert fn is torch_backend._node_is_local
        return self.local

    def get_resources_per_worker(self):
        return {"CPU": 1}

    def __len__(self):
        return 2


def test_a_multi_node_cluster_gets_rays_own_process_group_setup(monkeypatch):
    delegated = []
    monkeypatch.setattr(torch_backend._RayTorchBackend, "on_start",
                        lambda self, group, config: delegated.append(config))
    group = _FakeGroup(local=False)
    config = torch_backend.LoopbackTorchConfig()
    torch_backend.LoopbackTorchBackend().on_start(group, config)
    assert delegated == [config] and group.calls == ["_node_is_local"]
