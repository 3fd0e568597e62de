"""KubeRay / Kubernetes manifests in infra/k8s: parsed and checked field by field.

No cluster here, so these are the checks a reviewer would do by hand: kinds and fields the
target KubeRay knows (RayCluster/RayJob: >= 1.6.2; RayCronJob: >= 1.7.0), read from those
releases' CRDs (kuberay_crd_fields.json), deletion strategies the operator accepts, pinned
images matching the package pins, entrypoints that name real job modules and config files,
valid schedules, GPU requests on GPU groups, token auth, no plaintext secrets, no externally
exposed dashboard, no telemetry.
"""

from __future__ import annotations

import argparse
import importlib
import json
import re
import shlex
from datetime import datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "infra" / "k8s"
NAMESPACE = "reactdiff"
CLUSTER = "reactdiff"

# Job module -> its bundled config file (jobs/configs/<file>.yaml).
JOB_CONFIGS = {
    "extract": "extract.yaml",
    "train": "train.yaml",
    "evaluate": "evaluate.yaml",
    "promote": "promote.yaml",
    "generate": "generate.yaml",
}
PIPELINE_STEPS = {"extract", "train-autoencoder", "train-diffusion", "evaluate", "promote", "generate"}

KNOWN_KINDS = {
    ("v1", "Namespace"),
    ("v1", "ServiceAccount"),
    ("v1", "Service"),
    ("apps/v1", "Deployment"),
    ("batch/v1", "CronJob"),
    ("networking.k8s.io/v1", "NetworkPolicy"),
    ("ray.io/v1", "RayCluster"),
    ("ray.io/v1", "RayJob"),
    ("ray.io/v1", "RayCronJob"),
}

# The CRDs' spec fields (kubectl validates strictly by default, so a field the CRD lacks fails
# `kubectl apply`): everything must be known to the oldest KubeRay the README supports for it.
CRDS = json.loads((Path(__file__).with_name("kuberay_crd_fields.json")).read_text())
MIN_KUBERAY = "v1.6.2"           # RayCluster, RayJob (README: KubeRay >= 1.6.2)
MIN_KUBERAY_CRONJOB = "v1.7.0"   # RayCronJob: one RayJob per tick (kuberay#4888) and timeZone
RAYCRONJOB_SPEC_FIELDS = set(CRDS[MIN_KUBERAY_CRONJOB]["RayCronJob.spec"])
RAYJOB_SPEC_FIELDS = set(CRDS[MIN_KUBERAY]["RayJob.spec"])
RAYCLUSTER_SPEC_FIELDS = set(CRDS[MIN_KUBERAY]["RayCluster.spec"])
WORKER_GROUP_FIELDS = set(CRDS[MIN_KUBERAY]["RayCluster.spec.workerGroupSpecs[]"])


# ------------------------------------------------------------------------------------------
# loading


def _manifest_files() -> list[Path]:
    return sorted(p for p in K8S.rglob("*.yaml") if p.name != "kustomization.yaml")


def _docs() -> list[tuple[Path, dict]]:
    out = []
    for path in _manifest_files():
        for doc in yaml.safe_load_all(path.read_text()):
            if doc is not None:
                out.append((path, doc))
    return out


DOCS = _docs()


def _of_kind(kind: str) -> list[tuple[Path, dict]]:
    return [(p, d) for p, d in DOCS if d["kind"] == kind]


def _one(kind: str, name: str) -> dict:
    found = [d for _, d in _of_kind(kind) if d["metadata"].get("name") == name]
    assert len(found) == 1, f"expected one {kind} {name}, found {len(found)}"
    return found[0]


def _pin(package: str) -> str:
    for line in (REPO / "constraints.txt").read_text().splitlines():
        if line.startswith(f"{package}=="):
            return line.split("==", 1)[1].strip()
    raise AssertionError(f"{package} is not pinned in constraints.txt")


def _ray_cluster_specs() -> list[tuple[str, dict]]:
    """Every RayClusterSpec: the RayCluster's and those embedded in RayJob / RayCronJob."""
    specs = []
    for path, doc in DOCS:
        if doc["kind"] == "RayCluster":
            specs.append((f"{path.name}:RayCluster", doc["spec"]))
        elif doc["kind"] == "RayJob" and "rayClusterSpec" in doc["spec"]:
            specs.append((f"{path.name}:RayJob", doc["spec"]["rayClusterSpec"]))
        elif doc["kind"] == "RayCronJob" and "rayClusterSpec" in doc["spec"]["jobTemplate"]:
            specs.append((f"{path.name}:RayCronJob", doc["spec"]["jobTemplate"]["rayClusterSpec"]))
    return specs


def _ray_groups(spec: dict) -> list[tuple[str, dict]]:
    """(group name, pod spec) for the head and every worker group of a RayClusterSpec."""
    groups = [("head", spec["headGroupSpec"]["template"]["spec"])]
    groups += [(g["groupName"], g["template"]["spec"]) for g in spec.get("workerGroupSpecs", [])]
    return groups


def _pod_specs() -> list[tuple[str, dict]]:
    """Every pod spec in the manifests: Ray groups, Deployments, CronJobs."""
    pods = []
    for where, spec in _ray_cluster_specs():
        pods += [(f"{where}/{name}", pod) for name, pod in _ray_groups(spec)]
    for path, doc in DOCS:
        if doc["kind"] == "Deployment":
            pods.append((f"{path.name}:Deployment", doc["spec"]["template"]["spec"]))
        elif doc["kind"] == "CronJob":
            pods.append((f"{path.name}:CronJob", doc["spec"]["jobTemplate"]["spec"]["template"]["spec"]))
    return pods


def _containers(pod: dict) -> list[dict]:
    return list(pod.get("initContainers", [])) + list(pod["containers"])


def _env(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env", [])}


def _entrypoints() -> list[tuple[str, str]]:
    """(where, shell command line) of every job entrypoint: RayJobs, RayCronJob, CronJob."""
    out = []
    for path, doc in DOCS:
        if doc["kind"] == "RayJob":
            out.append((path.name, doc["spec"]["entrypoint"]))
        elif doc["kind"] == "RayCronJob":
            out.append((path.name, doc["spec"]["jobTemplate"]["entrypoint"]))
        elif doc["kind"] == "CronJob":
            container = doc["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]
            script = " ".join(container.get("args", []))
            # the command after `--` of `ray job submit` (line continuations joined, `&` dropped)
            line = script.replace("\\\n", " ")
            submit = next(ln for ln in line.splitlines() if "ray job submit" in ln)
            out.append((path.name, submit.split(" -- ", 1)[1].rstrip(" &")))
    return out


def _job_argv(command: str) -> tuple[str, list[str]]:
    """``python -m jobs.<name> ARGS`` -> (name, ARGS)."""
    argv = shlex.split(command)
    assert argv[:2] == ["python", "-m"] and argv[2].startswith("jobs."), command
    return argv[2].split(".", 1)[1], argv[3:]


# ------------------------------------------------------------------------------------------
# cron


_CRON_RANGES = [(0, 59), (0, 23), (1, 31), (1, 12), (0, 7)]


def _cron_field(field: str, lo: int, hi: int) -> set[int]:
    values: set[int] = set()
    for part in field.split(","):
        step = 1
        if "/" in part:
            part, step_s = part.split("/", 1)
            if not step_s.isdigit() or int(step_s) == 0:
                raise ValueError(f"bad step in {field!r}")
            step = int(step_s)
        if part == "*":
            start, end = lo, hi
        elif "-" in part:
            a, b = part.split("-", 1)
            if not (a.isdigit() and b.isdigit()):
                raise ValueError(f"bad range in {field!r}")
            start, end = int(a), int(b)
        elif part.isdigit():
            start = end = int(part)
            if step != 1:
                end = hi
        else:
            raise ValueError(f"bad cron field {field!r}")
        if not (lo <= start <= end <= hi):
            raise ValueError(f"{field!r} out of range {lo}-{hi}")
        values.update(range(start, end + 1, step))
    return values


def parse_cron(expr: str) -> list[set[int]]:
    """A standard 5-field cron expression -> the allowed values of each field."""
    fields = expr.split()
    if len(fields) != 5:
        raise ValueError(f"cron needs 5 fields, got {len(fields)}: {expr!r}")
    parsed = [_cron_field(f, lo, hi) for f, (lo, hi) in zip(fields, _CRON_RANGES)]
    parsed[4] = {d % 7 for d in parsed[4]}  # 7 is Sunday too
    return parsed


def cron_min_period(expr: str) -> timedelta:
    """The shortest gap between two firings (brute force over two weeks of minutes)."""
    minute, hour, dom, month, dow = parse_cron(expr)
    dom_any, dow_any = expr.split()[2] == "*", expr.split()[4] == "*"
    t, end, fires = datetime(2030, 1, 1), datetime(2030, 1, 15), []
    while t < end:
        day_ok = (t.day in dom) if dow_any else (t.isoweekday() % 7 in dow) if dom_any else (
            t.day in dom or t.isoweekday() % 7 in dow)
        if t.minute in minute and t.hour in hour and t.month in month and day_ok:
            fires.append(t)
        t += timedelta(minutes=1)
    assert len(fires) >= 2, f"{expr!r} fires less than twice in two weeks"
    return min(b - a for a, b in zip(fires, fires[1:]))


def test_cron_parser_rejects_bad_expressions():
    for bad in ["* * * *", "61 * * * *", "* 24 * * *", "*/0 * * * *", "a * * * *", "5-1 * * * *"]:
        with pytest.raises(ValueError):
            parse_cron(bad)
    assert cron_min_period("30 2 * * *") == timedelta(days=1)
    assert cron_min_period("*/15 * * * *") == timedelta(minutes=15)


# ------------------------------------------------------------------------------------------
# structure


def test_every_manifest_parses_with_a_known_kind_in_the_namespace():
    assert DOCS, "no manifests found under infra/k8s"
    for path, doc in DOCS:
        assert (doc.get("apiVersion"), doc.get("kind")) in KNOWN_KINDS, f"{path.name}: {doc.get('kind')}"
        meta = doc["metadata"]
        assert meta.get("name") or meta.get("generateName"), f"{path.name}: unnamed {doc['kind']}"
        if doc["kind"] != "Namespace":
            assert meta.get("namespace") == NAMESPACE, f"{path.name}: {doc['kind']} outside {NAMESPACE}"


def test_the_deployment_has_every_piece():
    _one("Namespace", NAMESPACE)
    _one("RayCluster", CLUSTER)
    _one("RayCronJob", "reactdiff-extract-nightly")
    _one("CronJob", "reactdiff-extract-nightly")
    _one("Deployment", "mlflow")
    _one("Service", "mlflow")
    steps = {d["metadata"]["labels"]["app.kubernetes.io/component"] for _, d in _of_kind("RayJob")}
    assert steps == PIPELINE_STEPS


def test_kustomization_applies_the_long_lived_part_only():
    kust = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    resources = kust["resources"]
    for rel in resources:
        assert (K8S / rel).is_file(), f"kustomization lists missing {rel}"
    kinds = {d["kind"] for rel in resources for d in yaml.safe_load_all((K8S / rel).read_text()) if d}
    # RayJobs run when created (one per run, `kubectl create`); RayCronJob needs an alpha gate.
    assert "RayJob" not in kinds and "RayCronJob" not in kinds
    assert {"RayCluster", "Deployment", "CronJob", "NetworkPolicy", "ServiceAccount"} <= kinds


def test_ray_resources_use_only_fields_the_crds_know():
    for path, doc in _of_kind("RayCronJob"):
        assert set(doc["spec"]) <= RAYCRONJOB_SPEC_FIELDS, f"{path.name}: {set(doc['spec']) - RAYCRONJOB_SPEC_FIELDS}"
        assert set(doc["spec"]["jobTemplate"]) <= RAYJOB_SPEC_FIELDS
    for path, doc in _of_kind("RayJob"):
        assert set(doc["spec"]) <= RAYJOB_SPEC_FIELDS, f"{path.name}: {set(doc['spec']) - RAYJOB_SPEC_FIELDS}"
        # generateName: every `kubectl create` is a new run; a fixed name would collide.
        assert doc["metadata"].get("generateName") and not doc["metadata"].get("name")
        # either an own cluster or the long-lived one, not both
        assert ("clusterSelector" in doc["spec"]) != ("rayClusterSpec" in doc["spec"])
        if "clusterSelector" in doc["spec"]:
            assert doc["spec"]["clusterSelector"] == {"ray.io/cluster": CLUSTER}
            assert not doc["spec"].get("shutdownAfterJobFinishes", False)
    for where, spec in _ray_cluster_specs():
        assert set(spec) <= RAYCLUSTER_SPEC_FIELDS, f"{where}: {set(spec) - RAYCLUSTER_SPEC_FIELDS}"
        for group in spec.get("workerGroupSpecs", []):
            assert set(group) <= WORKER_GROUP_FIELDS, f"{where}: {set(group) - WORKER_GROUP_FIELDS}"


# ------------------------------------------------------------------------------------------
# images and versions


def test_images_are_pinned_and_match_the_package_pins():
    from reactdiff import __version__

    ray_pin, mlflow_pin = _pin("ray"), _pin("mlflow")
    seen = set()
    for where, pod in _pod_specs():
        for c in _containers(pod):
            image = c["image"]
            seen.add(image)
            name, _, tag = image.rpartition(":")
            assert name and "/" not in tag, f"{where}: image without a tag: {image}"
            assert tag != "latest" and re.search(r"\d", tag), f"{where}: unpinned image {image}"
            if name.endswith("/reactdiff-pipeline"):
                assert re.fullmatch(rf"{re.escape(__version__)}-ray{re.escape(ray_pin)}-py311-(cpu|gpu)", tag), image
            if name.endswith("/mlflow-server"):
                assert tag == mlflow_pin, image
    assert any(i.endswith("-gpu") for i in seen) and any(i.endswith("-cpu") for i in seen)
    for where, spec in _ray_cluster_specs():
        assert spec["rayVersion"] == ray_pin, where


def test_dockerfiles_build_what_the_manifests_run():
    ray_pin, mlflow_pin = _pin("ray"), _pin("mlflow")
    pipeline = (REPO / "infra/docker/Dockerfile").read_text()
    assert f"rayproject/ray:{ray_pin}-py311-gpu" in pipeline
    assert "pip install --no-cache-dir -c constraints.txt ." in pipeline
    assert "ffmpeg" in pipeline and "libsndfile1" in pipeline
    assert "WORKDIR /home/ray/reactdiff-pipeline" in pipeline  # jobs/configs/*.yaml resolve
    server = (REPO / "infra/docker/mlflow.Dockerfile").read_text()
    assert f"mlflow=={mlflow_pin}" in server and "psycopg2" in server
    assert f"boto3=={_pin('boto3')}" in server


# ------------------------------------------------------------------------------------------
# entrypoints


def test_entrypoints_run_job_modules_with_their_config():
    found = set()
    for where, command in _entrypoints():
        name, args = _job_argv(command)
        assert name in JOB_CONFIGS, f"{where}: unknown job module jobs.{name}"
        assert "--config" in args, f"{where}: no --config"
        assert args[args.index("--config") + 1] == f"jobs/configs/{JOB_CONFIGS[name]}", where
        found.add(name)
    assert {"extract", "train", "evaluate", "promote"} <= found


def test_scheduled_extraction_is_incremental():
    scheduled = [(w, c) for w, c in _entrypoints() if w.startswith(("cronjob", "raycronjob"))]
    assert len(scheduled) == 2
    for where, command in scheduled:
        name, args = _job_argv(command)
        assert name == "extract"
        assert "incremental_from=latest" in [args[i + 1] for i, a in enumerate(args) if a == "--set"], where


def test_training_and_evaluation_entrypoints_name_stage_model_and_split():
    by_component = {d["metadata"]["labels"]["app.kubernetes.io/component"]: d["spec"]["entrypoint"]
                    for _, d in _of_kind("RayJob")}
    assert "--stage autoencoder" in by_component["train-autoencoder"]
    assert "--stage diffusion" in by_component["train-diffusion"]
    assert "--model models:/reactdiff@challenger" in by_component["evaluate"]
    assert re.search(r"--split (val|test)\b", by_component["evaluate"])
    assert "--candidate challenger" in by_component["promote"] and "--name reactdiff" in by_component["promote"]
    for stage in ("train-autoencoder", "train-diffusion"):
        _, args = _job_argv(by_component[stage])
        # multi-node Ray Train needs shared checkpoint storage, not the head's disk
        assert args[args.index("--storage") + 1].startswith("s3://reactdiff-data/react/checkpoints"), stage
        assert args[args.index("--features") + 1].startswith("s3://reactdiff-data/react/snapshots/"), stage
        assert "--gpu" in args and args[args.index("--preset") + 1] == "paper", stage


def _extraction_inputs(command: str) -> dict[str, object]:
    _, args = _job_argv(command)
    value = {a: args[i + 1] for i, a in enumerate(args) if a in ("--data", "--out", "--feature-set")}
    value["--model"] = sorted(args[i + 1] for i, a in enumerate(args) if a == "--model")
    return value


def test_every_extraction_uses_the_same_data_and_feature_set():
    # Incremental runs carry over clips only when the feature set and its models are unchanged.
    extractions = [(w, c) for w, c in _entrypoints() if _job_argv(c)[0] == "extract"]
    assert len(extractions) == 3  # the RayJob and both schedules
    first = _extraction_inputs(extractions[0][1])
    assert first["--data"] == "s3://reactdiff-data/react/raw"
    assert first["--out"] == "s3://reactdiff-data/react/snapshots"
    if first["--feature-set"] == "paper":
        assert [m.split("=")[0] for m in first["--model"]] == ["au", "fe", "va", "wav2vec2"]
    for where, command in extractions[1:]:
        assert _extraction_inputs(command) == first, where


def test_entrypoint_config_files_exist():
    if not any((REPO / "jobs" / "configs").glob("*.yaml")):
        pytest.skip("jobs/configs has no config files yet")
    for where, command in _entrypoints():
        _, args = _job_argv(command)
        config = REPO / args[args.index("--config") + 1]
        assert config.is_file(), f"{where}: {config.relative_to(REPO)} does not exist"


@pytest.mark.parametrize("where,command", _entrypoints(), ids=[w for w, _ in _entrypoints()])
def test_entrypoint_arguments_parse_with_the_job_cli(where, command):
    name, args = _job_argv(command)
    if not (REPO / "jobs" / f"{name}.py").is_file():
        pytest.skip(f"jobs/{name}.py does not exist yet")
    module = importlib.import_module(f"jobs.{name}")
    parser = argparse.ArgumentParser(prog=f"python -m jobs.{name}", exit_on_error=False)
    module.add_arguments(parser)
    try:
        parser.parse_args(args)
    except (argparse.ArgumentError, SystemExit) as exc:
        pytest.fail(f"{where}: jobs.{name} rejects {args}: {exc}")


# ------------------------------------------------------------------------------------------
# schedules


def test_schedules_are_valid_cron_and_cannot_overlap():
    cron = _one("CronJob", "reactdiff-extract-nightly")["spec"]
    period = cron_min_period(cron["schedule"])
    assert period >= timedelta(hours=1)
    assert cron["concurrencyPolicy"] == "Forbid"
    assert cron["jobTemplate"]["spec"]["activeDeadlineSeconds"] < period.total_seconds()
    assert cron["jobTemplate"]["spec"]["backoffLimit"] == 0
    assert cron["jobTemplate"]["spec"]["template"]["spec"]["restartPolicy"] == "Never"

    ray_cron = _one("RayCronJob", "reactdiff-extract-nightly")["spec"]
    ray_period = cron_min_period(ray_cron["schedule"])
    # RayCronJob has no concurrencyPolicy: the deadline must end a run before the next tick.
    assert ray_cron["jobTemplate"]["activeDeadlineSeconds"] < ray_period.total_seconds()
    # An explicit zone (KubeRay >= 1.7.0), one the time zone database knows.
    assert set(ray_cron) >= set(CRDS[MIN_KUBERAY_CRONJOB]["RayCronJob.spec.required"])
    assert ZoneInfo(ray_cron["timeZone"]) and ray_cron["timeZone"] == cron["timeZone"]
    # Every tick's extraction cluster is deleted whatever the outcome, the RayJob later.
    rules = _deletion_rules(ray_cron["jobTemplate"])
    for condition in ({"jobStatus": "SUCCEEDED"}, {"jobStatus": "FAILED"}, {"jobDeploymentStatus": "Failed"}):
        assert {"DeleteCluster", "DeleteSelf"} <= _policies(rules, condition), condition


# ------------------------------------------------------------------------------------------
# deletion of finished RayJobs


def _deletion_rules(job_spec: dict) -> list[dict]:
    return job_spec.get("deletionStrategy", {}).get("deletionRules", [])


def _policies(rules: list[dict], condition: dict) -> set[str]:
    return {r["policy"] for r in rules if {k: v for k, v in r["condition"].items() if k != "ttlSeconds"} == condition}


def deletion_strategy_errors(job_spec: dict) -> list[str]:
    """What the CRD (its OpenAPI schema and CEL rules) and the operator's validation
    (ray-operator/controllers/ray/utils/validation.go, validateDeletionConfiguration and
    validateDeletionRules at v1.6.2/v1.7.0) would reject in ``job_spec.deletionStrategy``."""
    import jsonschema

    strategy = job_spec.get("deletionStrategy")
    if strategy is None:
        return ["no deletionStrategy"]
    errors = [e.message for e in jsonschema.Draft7Validator(
        CRDS[MIN_KUBERAY]["RayJob.spec.deletionStrategy"]).iter_errors(strategy)]
    legacy, rules = "onSuccess" in strategy or "onFailure" in strategy, strategy.get("deletionRules", [])
    if legacy and rules:
        errors.append("legacy onSuccess/onFailure and deletionRules together")
    if not rules and not ("onSuccess" in strategy and "onFailure" in strategy):
        errors.append("needs both onSuccess and onFailure, or deletionRules")
    if rules and job_spec.get("shutdownAfterJobFinishes"):
        errors.append("shutdownAfterJobFinishes and deletionRules are mutually exclusive")
    if job_spec.get("ttlSecondsAfterFinished") and not job_spec.get("shutdownAfterJobFinishes"):
        errors.append("ttlSecondsAfterFinished needs shutdownAfterJobFinishes")
    autoscaling = job_spec.get("rayClusterSpec", {}).get("enableInTreeAutoscaling", False)
    ttls: dict[tuple, dict[str, int]] = {}
    for i, rule in enumerate(rules):
        cond = rule.get("condition", {})
        keys = {k for k in ("jobStatus", "jobDeploymentStatus") if k in cond}
        if len(keys) != 1:
            errors.append(f"rule {i}: exactly one of jobStatus and jobDeploymentStatus")
            continue
        if "clusterSelector" in job_spec and rule["policy"] in ("DeleteCluster", "DeleteWorkers"):
            errors.append(f"rule {i}: {rule['policy']} on a cluster the job does not own (clusterSelector)")
        if autoscaling and rule["policy"] == "DeleteWorkers":
            errors.append(f"rule {i}: DeleteWorkers with autoscaling")
        key = (keys.pop(), cond.get("jobStatus") or cond.get("jobDeploymentStatus"))
        if rule["policy"] in ttls.setdefault(key, {}):
            errors.append(f"rule {i}: duplicate {rule['policy']} for {key}")
        ttls[key][rule["policy"]] = cond.get("ttlSeconds", 0)
    for key, by_policy in ttls.items():   # Workers <= Cluster <= Self
        order = [by_policy[p] for p in ("DeleteWorkers", "DeleteCluster", "DeleteSelf") if p in by_policy]
        if order != sorted(order):
            errors.append(f"{key}: TTLs must not decrease from DeleteWorkers to DeleteCluster to DeleteSelf")
    return errors


def test_the_deletion_check_rejects_what_kuberay_rejects():
    ok = {"clusterSelector": {"ray.io/cluster": CLUSTER}, "deletionStrategy": {"deletionRules": [
        {"policy": "DeleteSelf", "condition": {"jobStatus": "SUCCEEDED", "ttlSeconds": 60}}]}}
    assert deletion_strategy_errors(ok) == []
    bad = [
        {"clusterSelector": {"x": "y"}, "deletionStrategy": {"deletionRules": [
            {"policy": "DeleteCluster", "condition": {"jobStatus": "SUCCEEDED"}}]}},
        {"deletionStrategy": {"deletionRules": [{"policy": "DeleteSelf", "condition": {"jobStatus": "DONE"}}]}},
        {"shutdownAfterJobFinishes": True, **ok},
        {"deletionStrategy": {"deletionRules": [
            {"policy": "DeleteSelf", "condition": {"jobStatus": "FAILED", "ttlSeconds": 10}},
            {"policy": "DeleteCluster", "condition": {"jobStatus": "FAILED", "ttlSeconds": 20}}]}},
        {"deletionStrategy": {"onSuccess": {"policy": "DeleteSelf"}}},
        {},
    ]
    for spec in bad:
        assert deletion_strategy_errors(spec), spec


def test_finished_rayjobs_are_deleted_and_long_lived_clusters_kept():
    specs = [(p.name, d["spec"]) for p, d in _of_kind("RayJob")]
    specs += [(p.name, d["spec"]["jobTemplate"]) for p, d in _of_kind("RayCronJob")]
    for where, spec in specs:
        assert deletion_strategy_errors(spec) == [], where
        rules = _deletion_rules(spec)
        for condition in ({"jobStatus": "SUCCEEDED"}, {"jobStatus": "FAILED"}, {"jobDeploymentStatus": "Failed"}):
            assert "DeleteSelf" in _policies(rules, condition), f"{where}: kept forever after {condition}"


# ------------------------------------------------------------------------------------------
# generation on a GPU


def test_the_generate_rayjob_runs_its_driver_on_a_gpu_worker():
    (path, job), = [(p, d) for p, d in _of_kind("RayJob")
                    if d["metadata"]["labels"]["app.kubernetes.io/component"] == "generate"]
    spec = job["spec"]
    assert spec["entrypointNumGpus"] >= 1, path.name
    name, args = _job_argv(spec["entrypoint"])
    assert name == "generate" and args[args.index("--model") + 1] == "models:/reactdiff@champion"
    for flag in ("--speaker-video", "--out"):       # the GPU worker reads and writes S3, not a disk
        assert args[args.index(flag) + 1].startswith("s3://reactdiff-data/react/"), flag
    cluster = _one("RayCluster", CLUSTER)["spec"]
    assert any(int(g["template"]["spec"]["containers"][0]["resources"]["limits"].get("nvidia.com/gpu", 0))
               >= spec["entrypointNumGpus"] and g["maxReplicas"] >= 1 for g in cluster["workerGroupSpecs"])


def test_scheduled_submitter_is_idempotent_and_stops_its_job():
    pod = _one("CronJob", "reactdiff-extract-nightly")["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    container = pod["containers"][0]
    script = container["args"][0]
    env = _env(container)
    assert '--submission-id "$JOB_NAME"' in script
    assert env["JOB_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.labels['batch.kubernetes.io/job-name']"
    assert "trap stop_job TERM" in script and "ray job stop" in script
    assert env["RAY_API_SERVER_ADDRESS"]["value"] == f"http://{CLUSTER}-head-svc.{NAMESPACE}.svc.cluster.local:8265"


# ------------------------------------------------------------------------------------------
# resources


def test_gpu_groups_request_gpus_and_cpu_groups_do_not():
    gpu_groups = 0
    for where, spec in _ray_cluster_specs():
        assert spec.get("enableInTreeAutoscaling") is True, where
        for name, pod in _ray_groups(spec):
            for c in pod["containers"]:
                res = c["resources"]
                for kind in ("cpu", "memory"):
                    assert kind in res["requests"] and kind in res["limits"], f"{where}/{name}: no {kind}"
                gpus = int(res["limits"].get("nvidia.com/gpu", 0))
                if "gpu" in name:
                    gpu_groups += 1
                    assert gpus >= 1, f"{where}/{name}: GPU group without a GPU limit"
                    assert res["requests"].get("nvidia.com/gpu") == res["limits"]["nvidia.com/gpu"]
                    assert any(t.get("key") == "nvidia.com/gpu" for t in pod.get("tolerations", []))
                else:
                    assert gpus == 0, f"{where}/{name}: non-GPU group asks for GPUs"
        for group in spec.get("workerGroupSpecs", []):
            assert 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"], group["groupName"]
        assert spec["headGroupSpec"]["rayStartParams"].get("num-cpus") == "0", f"{where}: tasks on the head"
    assert gpu_groups >= 3  # train + extract in the RayCluster, extract in the RayCronJob


def test_every_container_has_resource_limits():
    for where, pod in _pod_specs():
        for c in _containers(pod):
            assert {"cpu", "memory"} <= set(c["resources"]["limits"]), f"{where}/{c['name']}"


# ------------------------------------------------------------------------------------------
# security


SECRET_PATTERNS = [
    re.compile(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b"),  # AWS access key id
    re.compile(r"(?i)aws_secret_access_key\s*[:=]\s*\S+"),
    re.compile(r"(?i)aws_access_key_id\s*[:=]\s*\S+"),
    re.compile(r"(?i)\bpassword\s*[:=]\s*\S+"),
    re.compile(r"(?i)\b(auth_token|token)\s*:\s*[\"']?[0-9a-f]{32,}"),
    re.compile(r"postgres(ql)?://[^:/\s]+:(?!PASSWORD@)[^@\s]+@"),  # URI with a real password
    re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
]


def _secret_findings(text: str) -> list[str]:
    return [m.group(0) for p in SECRET_PATTERNS for m in p.finditer(text)]


def test_secret_scanner_finds_planted_secrets():
    planted = [
        "AKIAIOSFODNN7EXAMPLE",
        "aws_secret_access_key = wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
        "password: hunter2",
        "auth_token: 3f2a9c0d4e5b6a7988776655443322110ffeeddccbbaa9988",
        "postgresql://mlflow:s3cr3t@db:5432/mlflow",
    ]
    for text in planted:
        assert _secret_findings(text), text
    assert not _secret_findings("postgresql://USER:PASSWORD@HOST:5432/mlflow")


def test_no_plaintext_secrets_in_manifests():
    files = _manifest_files() + [K8S / "kustomization.yaml", REPO / "infra/docker/Dockerfile",
                                  REPO / "infra/docker/mlflow.Dockerfile"]
    for path in files:
        findings = _secret_findings(path.read_text())
        assert not findings, f"{path.relative_to(REPO)}: {findings}"
    # Secrets are referenced by name only; none is defined here.
    assert not _of_kind("Secret")
    for _, doc in DOCS:
        assert "stringData" not in doc and "data" not in doc
    # Anything that looks like a credential comes from a Secret, never a literal value.
    for where, pod in _pod_specs():
        for c in _containers(pod):
            for name, e in _env(c).items():
                if re.search(r"TOKEN|PASSWORD|SECRET|_KEY|BACKEND_STORE_URI", name):
                    assert "secretKeyRef" in e.get("valueFrom", {}), f"{where}/{c['name']}: {name} is a literal"


def test_dashboards_are_not_exposed_outside_the_cluster():
    for path, doc in _of_kind("Service"):
        assert doc["spec"].get("type", "ClusterIP") == "ClusterIP", path.name
    for where, spec in _ray_cluster_specs():
        head = spec["headGroupSpec"]
        assert head.get("serviceType", "ClusterIP") == "ClusterIP", where
        assert not head.get("enableIngress", False), where
    for where, pod in _pod_specs():
        assert not pod.get("hostNetwork", False), where
        for c in _containers(pod):
            assert all("hostPort" not in p for p in c.get("ports", [])), f"{where}/{c['name']}"
    assert not [d for _, d in DOCS if d["kind"] in {"Ingress", "Route", "Gateway", "HTTPRoute"}]


def test_network_policies_admit_only_this_namespace():
    policies = {d["metadata"]["name"]: d["spec"] for _, d in _of_kind("NetworkPolicy")}
    deny = [s for s in policies.values() if s["podSelector"] == {} and not s.get("ingress")]
    assert deny and all("Ingress" in s["policyTypes"] for s in deny), "no default-deny ingress policy"
    for name, spec in policies.items():
        for rule in spec.get("ingress", []):
            for peer in rule["from"]:
                assert "ipBlock" not in peer, f"{name}: ipBlock admits outside traffic"
                if "namespaceSelector" in peer:
                    # another namespace only by exact name, and only to the head's job API
                    assert peer["namespaceSelector"]["matchLabels"], name
                    assert spec["podSelector"]["matchLabels"]["ray.io/node-type"] == "head"
                    assert [p["port"] for p in rule["ports"]] == [8265]
                else:
                    assert set(peer) == {"podSelector"}, name


def test_token_authentication_everywhere():
    cluster = _one("RayCluster", CLUSTER)["spec"]
    assert cluster["authOptions"]["mode"] == "token"
    secret = cluster["authOptions"]["secretName"]
    for where, spec in _ray_cluster_specs():
        assert spec["authOptions"]["mode"] == "token", where
    submit = _one("CronJob", "reactdiff-extract-nightly")["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    env = _env(submit["containers"][0])
    assert env["RAY_AUTH_MODE"]["value"] == "token"
    assert env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": secret, "key": "auth_token"}
    assert submit["automountServiceAccountToken"] is False


def test_ray_and_submitter_containers_disable_usage_stats():
    for where, spec in _ray_cluster_specs():
        for name, pod in _ray_groups(spec):
            for c in pod["containers"]:
                assert _env(c)["RAY_USAGE_STATS_ENABLED"]["value"] == "0", f"{where}/{name}"
        autoscaler_env = {e["name"]: e["value"] for e in spec["autoscalerOptions"]["env"]}
        assert autoscaler_env["RAY_USAGE_STATS_ENABLED"] == "0", where
    cron = _one("CronJob", "reactdiff-extract-nightly")["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    assert _env(cron["containers"][0])["RAY_USAGE_STATS_ENABLED"]["value"] == "0"


def test_pods_run_as_non_root_without_privilege_escalation():
    for where, pod in _pod_specs():
        assert pod["securityContext"]["runAsNonRoot"] is True, where
        for c in _containers(pod):
            assert c["securityContext"]["allowPrivilegeEscalation"] is False, f"{where}/{c['name']}"


def test_s3_access_is_through_irsa_service_accounts():
    accounts = {d["metadata"]["name"]: d for _, d in _of_kind("ServiceAccount")}
    arn = re.compile(r"arn:aws:iam::\d{12}:role/[\w+=,.@-]+")
    for where, pod in _pod_specs():
        sa = pod.get("serviceAccountName")
        assert sa in accounts, f"{where}: service account {sa!r} is not defined"
        role = accounts[sa]["metadata"].get("annotations", {}).get("eks.amazonaws.com/role-arn")
        if "CronJob" in where and "RayCronJob" not in where:
            assert role is None, "the submitter needs no AWS role"
        else:
            assert role and arn.fullmatch(role), f"{where}: {sa} has no IRSA role"
    for where, pod in _pod_specs():
        for c in _containers(pod):
            assert not {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} & set(_env(c)), where


def test_mlflow_server_uses_postgres_from_a_secret_and_s3_artifacts():
    pod = _one("Deployment", "mlflow")["spec"]["template"]["spec"]
    server = pod["containers"][0]
    args = server["args"]
    assert args[0] == "server"
    assert "--backend-store-uri=$(MLFLOW_BACKEND_STORE_URI)" in args
    assert _env(server)["MLFLOW_BACKEND_STORE_URI"]["valueFrom"]["secretKeyRef"]["name"] == "reactdiff-mlflow-db"
    assert any(a.startswith("--artifacts-destination=s3://") for a in args)
    assert server["readinessProbe"]["httpGet"]["path"] == "/health"
    allowed = next(a for a in args if a.startswith("--allowed-hosts="))
    assert f"mlflow.{NAMESPACE}.svc.cluster.local:5000" in allowed
    migrate = pod["initContainers"][0]
    assert migrate["args"][:2] == ["db", "upgrade"]
    # every Ray container points at this server
    for where, spec in _ray_cluster_specs():
        for name, ray_pod in _ray_groups(spec):
            for c in ray_pod["containers"]:
                assert _env(c)["MLFLOW_TRACKING_URI"]["value"] == f"http://mlflow.{NAMESPACE}.svc.cluster.local:5000"
