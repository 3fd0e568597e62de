"""ray_cluster.yaml: valid for the installed Ray's cluster launcher, and safe.

Validated twice: against the JSON schema shipped inside the ray package
(ray/autoscaler/ray-schema.json) and through Ray's own prepare_config + validate_config (the
same code `ray up` runs before it talks to AWS).
"""

from __future__ import annotations

import copy
import json
import re
import shlex
from pathlib import Path

import jsonschema
import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "ray_cluster.yaml"


@pytest.fixture(scope="module")
def config() -> dict:
    return yaml.safe_load(CONFIG.read_text())


@pytest.fixture(scope="module")
def schema() -> dict:
    import ray.autoscaler

    path = Path(ray.autoscaler.__file__).parent / "ray-schema.json"
    assert path.is_file(), f"no cluster-config schema in the installed ray: {path}"
    return json.loads(path.read_text())


def _pin(package: str) -> str:
    for line in (REPO / "constraints.txt").read_text().splitlines():
        if line.startswith(f"{package}=="):
            return line.split("==", 1)[1].strip()
    raise AssertionError(f"{package} is not pinned in constraints.txt")


def _start_commands(config: dict, which: str) -> str:
    return "\n".join(config[f"{which}_start_ray_commands"])


def _ray_start(config: dict, which: str) -> list[str]:
    """The argv of the `ray start` in head/worker start commands."""
    for cmd in config[f"{which}_start_ray_commands"]:
        for part in re.split(r";|&&", cmd):
            argv = shlex.split(part)
            if argv[:2] == ["ray", "start"]:
                return argv
    raise AssertionError(f"no `ray start` in {which}_start_ray_commands")


def test_validates_against_the_schema_in_the_ray_package(config, schema):
    jsonschema.validate(config, schema)


def test_schema_validation_catches_mistakes(config, schema):
    # The check above can fail: a misspelt key or a wrong type is rejected.
    for mutate in (
        lambda c: c.update(idle_timeout="10"),
        lambda c: c["available_node_types"]["head"].update(max_worker=1),
        lambda c: c["available_node_types"]["gpu-train"].update(min_workers="0"),
        lambda c: c["docker"].update(imag="x"),
    ):
        bad = copy.deepcopy(config)
        mutate(bad)
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, schema)


def test_passes_rays_own_config_preparation(config):
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    assert prepared["provider"]["type"] == "aws"
    assert prepared["head_node_type"] == "head"


def test_node_types_autoscale_within_bounds(config):
    types = config["available_node_types"]
    assert config["head_node_type"] in types
    assert config["idle_timeout_minutes"] > 0
    assert types["head"]["resources"] == {"CPU": 0}, "no data/training tasks on the head"
    workers = {k: v for k, v in types.items() if k != config["head_node_type"]}
    assert sum(t["max_workers"] for t in workers.values()) >= config["max_workers"] > 0
    for name, t in workers.items():
        assert 0 == t["min_workers"] <= t["max_workers"] <= config["max_workers"], name
    gpu = {n: t["node_config"]["InstanceType"] for n, t in workers.items() if n.startswith("gpu")}
    assert any(re.match(r"(g5|g6|p4d|p5)\.", i) for n, i in gpu.items() if "train" in n)
    assert any(re.match(r"(g4dn|g5|g6)\.", i) for n, i in gpu.items() if "extract" in n)
    assert any(n.startswith("cpu") and "extract" in n for n in workers)
    assert types["head"]["node_config"]["InstanceType"].startswith(("m", "c", "r"))


def test_every_node_reaches_s3_through_an_instance_profile(config):
    for name, t in config["available_node_types"].items():
        profile = t["node_config"]["IamInstanceProfile"]
        assert profile.get("Name") or profile.get("Arn"), name
        assert t["node_config"]["MetadataOptions"]["HttpTokens"] == "required", f"{name}: IMDSv1"


def test_every_node_starts_ray_with_the_s3_region_and_no_proxy(config):
    # Ray worker processes inherit the `ray start` environment: the region boto3 needs, and
    # nothing that would route S3/MLflow traffic elsewhere.
    for which in ("head", "worker"):
        commands = _start_commands(config, which)
        assert f"AWS_DEFAULT_REGION={config['provider']['region']}" in commands, which
        assert commands.index("AWS_DEFAULT_REGION") < commands.index("ray start"), which
        assert not re.search(r"(?i)_proxy=", commands), which
    assert not re.search(r"(?i)_proxy=", "\n".join(config["setup_commands"]))


def test_no_keys_anywhere_in_the_file():
    text = CONFIG.read_text()
    assert not re.search(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b", text)
    assert not re.search(r"(?i)aws_(secret_access_key|access_key_id|session_token)\s*[:=]", text)
    assert not re.search(r"(?i)\b(RAY_AUTH_TOKEN|password)\s*[:=]", text)
    assert "BEGIN" not in text or "PRIVATE KEY" not in text
    assert not re.search(r"\b[0-9a-f]{64}\b", text), "something that looks like a Ray token"


def test_dashboard_binds_loopback_on_the_head(config):
    argv = _ray_start(config, "head")
    assert "--head" in argv
    assert "--dashboard-host=127.0.0.1" in argv
    assert "0.0.0.0" not in _start_commands(config, "head")
    assert "--dashboard-host" not in " ".join(_ray_start(config, "worker"))


def test_token_authentication_on_every_node(config):
    for which in ("head", "worker"):
        commands = _start_commands(config, which)
        assert re.search(r"\bRAY_AUTH_MODE=token\b", commands), which
        # set before `ray start`, in the same shell
        assert commands.index("RAY_AUTH_MODE=token") < commands.index("ray start")
    # the token itself travels as a file (generated locally), never as text in this config
    assert config["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"


def test_job_drivers_start_in_the_checkout(config):
    # drivers inherit the raylet's working directory: jobs/configs/<job>.yaml must resolve
    for which in ("head", "worker"):
        commands = _start_commands(config, which)
        assert commands.index("cd ~/reactdiff-pipeline &&") < commands.index("ray start")


def test_no_telemetry(config):
    for which in ("head", "worker"):
        commands = _start_commands(config, which)
        assert "RAY_USAGE_STATS_ENABLED=0" in commands
        assert "--disable-usage-stats" in _ray_start(config, which)


def test_setup_installs_the_package_with_its_pins_and_decoding_libraries(config):
    assert config["file_mounts"]["~/reactdiff-pipeline"] == "."
    setup = "\n".join(config["setup_commands"])
    assert "cd ~/reactdiff-pipeline && pip install" in setup
    assert "-c constraints.txt -e ." in setup
    assert "ffmpeg" in setup and "libsndfile1" in setup
    excluded = " ".join(config["rsync_exclude"])
    for path in (".git", ".venv", ".reactdiff"):
        assert path in excluded


def test_images_match_the_pinned_ray_and_python(config):
    ray_pin = _pin("ray")
    images = [config["docker"]["image"], config["docker"]["head_image"]]
    images += [t["docker"]["worker_image"] for t in config["available_node_types"].values() if "docker" in t]
    for image in images:
        assert re.fullmatch(rf"rayproject/ray:{re.escape(ray_pin)}-py311-(cpu|gpu)", image), image
    assert config["docker"]["image"].endswith("-gpu")  # GPU node types use the default image
    assert config["docker"]["head_image"].endswith("-cpu")


def test_nightly_extraction_script_for_the_launcher_cluster():
    import subprocess

    script_path = REPO / "infra" / "launcher" / "extract_nightly.sh"
    subprocess.run(["bash", "-n", str(script_path)], check=True)
    script = script_path.read_text()
    assert "flock -n" in script, "overlapping runs must be skipped"
    assert '--submission-id "$ID"' in script and 'ID="extract-$(date -u +%Y%m%d)"' in script
    assert "--set incremental_from=latest" in script
    assert "python -m jobs.extract --config jobs/configs/extract.yaml" in script
    assert 'ADDRESS="http://127.0.0.1:8265"' in script and "RAY_AUTH_MODE=token" in script
    # the same inputs as the Kubernetes schedules (incremental runs need the same feature set)
    manifest = (REPO / "infra/k8s/schedules/cronjob-extract-submit.yaml").read_text()
    for default in ("s3://reactdiff-data/react/raw", "s3://reactdiff-data/react/snapshots",
                    "s3://reactdiff-data/react/models"):
        assert default in script and default in manifest
    for name in ("au.pt", "va.pt", "fe.pt", "wav2vec2-base/pytorch_model.bin"):
        assert f"$MODELS/{name}" in script and f"react/models/{name}" in manifest
