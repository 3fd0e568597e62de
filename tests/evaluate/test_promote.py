"""Promotion: gate, alias moves, decision records, the registry lock, races and failures.

Real MLflow registry (sqlite). Metric sets are injected through ``promote(..., evaluator=...)``
so "better" and "worse" are exact; tests/evaluate/test_evaluate.py covers the real evaluator.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from pipeline.registry import promote as P
from pipeline.registry.promote import MetricGate, PromoteConfig, PromotionLock, apply_gate, promote

NAME = "reactdiff"


@pytest.fixture
def registry(mlflow_uri, tmp_path):
    """A registered model with versions 1..4 (no artifacts needed: metrics are injected)."""
    import mlflow

    c = mlflow.MlflowClient(mlflow_uri, registry_uri=mlflow_uri)
    c.create_registered_model(NAME)
    src = tmp_path / "model"
    src.mkdir()
    for _ in range(4):
        c.create_model_version(NAME, source=str(src))
    return c


def champion(c) -> str | None:
    try:
        return str(c.get_model_version_by_alias(NAME, "champion").version)
    except Exception:
        return None


def metrics_table(table):
    """An evaluator returning fixed metrics per version number."""
    calls = []

    def evaluate(version):
        calls.append(str(version.version))
        return table[str(version.version)]

    evaluate.calls = calls
    return evaluate


BEST = {"FRCorr": 0.30, "FRDist": 80.0}
GOOD = {"FRCorr": 0.20, "FRDist": 85.0}
BASE = {"FRCorr": 0.10, "FRDist": 90.0}
WORSE = {"FRCorr": 0.05, "FRDist": 95.0}


# ---------------------------------------------------------------------------------------------
# The gate


def test_gate_default_is_not_worse_on_frcorr_and_frdist():
    gate = P.default_gate()
    assert apply_gate(gate, GOOD, BASE).passed
    assert apply_gate(gate, BASE, BASE).passed                      # equal is "not worse"
    assert not apply_gate(gate, {"FRCorr": 0.2, "FRDist": 91.0}, BASE).passed   # FRDist higher
    assert not apply_gate(gate, {"FRCorr": 0.09, "FRDist": 80.0}, BASE).passed  # FRCorr lower
    assert apply_gate(gate, WORSE, None).passed                     # no champion: no comparison


def test_gate_thresholds_follow_metricthreshold_semantics():
    gate = {"FRCorr": MetricGate(min_absolute_change=0.05, threshold=0.12),
            "FRDist": MetricGate(min_relative_change=0.05)}
    # FRCorr must be >= 0.10 + 0.05 and >= 0.12; FRDist <= 90 - 0.05*90 = 85.5
    assert apply_gate(gate, {"FRCorr": 0.15, "FRDist": 85.5}, BASE).passed
    res = apply_gate(gate, {"FRCorr": 0.149, "FRDist": 85.6}, BASE)
    assert not res.passed
    # FRCorr: threshold ok, absolute change fails; FRDist: default "not higher" ok, relative change fails
    assert [c.passed for c in res.checks] == [True, False, True, False]
    # a negative min_absolute_change tolerates a small regression
    tolerant = {"FRCorr": MetricGate(min_absolute_change=-0.02)}
    assert apply_gate(tolerant, {"FRCorr": 0.085}, BASE).passed
    assert not apply_gate(tolerant, {"FRCorr": 0.079}, BASE).passed
    # absolute thresholds apply to the first model too; non-finite values fail
    assert not apply_gate({"FRCorr": MetricGate(threshold=0.2)}, BASE, None).passed
    assert not apply_gate(P.default_gate(), {"FRCorr": float("nan"), "FRDist": 1.0}, BASE).passed


def test_gate_yaml_parsing(tmp_path):
    from pipeline.config import ConfigError, read_yaml

    f = tmp_path / "gate.yaml"
    f.write_text("gate:\n  FRDiv: {threshold: 0.01}\n  FRDist: {min_absolute_change: 0.5}\n")
    gate = P.parse_gate(read_yaml(f))
    assert set(gate) == {"FRDiv", "FRDist"} and gate["FRDiv"].threshold == 0.01
    with pytest.raises(ConfigError):
        P.parse_gate({"FRCorr": {"min_abs": 1}})
    with pytest.raises(ConfigError, match="unknown metric"):
        PromoteConfig(gate={"Accuracy": MetricGate()}).validate()


# ---------------------------------------------------------------------------------------------
# Promotion decisions


def test_first_model_becomes_champion_then_noop(registry):
    ev = metrics_table({"1": BASE})
    res = promote(PromoteConfig(candidate="1"), evaluator=ev)
    assert (res.decision, res.exit_code, champion(registry)) == ("first", 0, "1")
    tags = registry.get_model_version(NAME, "1").tags
    assert tags["promotion.decision"] == "first" and tags["promotion.champion"] == "none"
    assert json.loads(tags["promotion.candidate_metrics"]) == BASE
    # the same candidate again: a clear no-op, nothing evaluated
    res = promote(PromoteConfig(candidate="1"), evaluator=ev)
    assert (res.decision, res.exit_code) == ("noop", 0) and "already" in res.message
    assert ev.calls == ["1"]


def test_better_candidate_is_promoted_and_recorded(registry):
    registry.set_registered_model_alias(NAME, "champion", "1")
    registry.set_registered_model_alias(NAME, "challenger", "2")
    ev = metrics_table({"1": BASE, "2": GOOD})
    res = promote(PromoteConfig(), evaluator=ev)                     # default candidate: @challenger
    assert (res.decision, res.exit_code) == ("promoted", 0)
    assert champion(registry) == "2"
    v2 = registry.get_model_version(NAME, "2")
    assert v2.tags["promotion.decision"] == "promoted" and v2.tags["promotion.champion"] == "1"
    assert json.loads(v2.tags["promotion.champion_metrics"]) == BASE
    assert json.loads(v2.tags["promotion.candidate_metrics"]) == GOOD
    assert "promoted vs champion v1" in v2.description and "FRCorr 0.2 vs 0.1" in v2.description
    v1 = registry.get_model_version(NAME, "1")
    assert v1.tags["promotion.replaced_by"] == "2"
    # no lock left behind
    assert NAME + PromotionLock.SUFFIX not in {m.name for m in registry.search_registered_models()}


def test_worse_candidate_is_refused(registry):
    registry.set_registered_model_alias(NAME, "champion", "1")
    ev = metrics_table({"1": BASE, "3": WORSE})
    res = promote(PromoteConfig(candidate="3"), evaluator=ev)
    assert (res.decision, res.exit_code) == ("refused", P.EXIT_REFUSED)
    assert champion(registry) == "1"
    v3 = registry.get_model_version(NAME, "3")
    assert v3.tags["promotion.decision"] == "refused"
    assert "FAILED" in v3.tags["promotion.gate"]
    assert registry.get_model_version(NAME, "1").tags["promotion.challenged_by.v3"].startswith("refused")
    # a refused first model leaves no champion at all
    registry.delete_registered_model_alias(NAME, "champion")
    res = promote(PromoteConfig(candidate="3", gate={"FRCorr": MetricGate(threshold=0.5)}), evaluator=ev)
    assert res.decision == "refused" and champion(registry) is None


def test_concurrent_promotions_compare_against_the_latest_champion(registry):
    """v2 and v3 both beat v1, v2 also beats v3. Both evaluate against v1 at the same time; the one
    that commits second must notice the champion moved and compare against the winner, so the
    final champion is v2 whatever the interleaving (a lost update would leave v3 half the time)."""
    registry.set_registered_model_alias(NAME, "champion", "1")
    table = {"1": BASE, "2": BEST, "3": GOOD}
    both_evaluated = threading.Barrier(2)
    results, errors = {}, []

    def evaluator(version):
        if str(version.version) == "1":
            try:
                both_evaluated.wait(timeout=20)   # both promoters now hold a stale view of v1
            except threading.BrokenBarrierError:
                pass
        return table[str(version.version)]

    def run(candidate, delay):
        try:
            time.sleep(delay)
            results[candidate] = promote(PromoteConfig(candidate=candidate, lock_wait_s=30), evaluator=evaluator)
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    for delays in ((0.0, 0.05), (0.05, 0.0)):
        registry.set_registered_model_alias(NAME, "champion", "1")
        both_evaluated.reset()
        threads = [threading.Thread(target=run, args=("2", delays[0])),
                   threading.Thread(target=run, args=("3", delays[1]))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert not errors, errors
        assert champion(registry) == "2"
        decisions = {c: r.decision for c, r in results.items()}
        # whoever came second was compared with the first one's outcome, not with v1
        assert decisions["2"] == "promoted"
        assert decisions["3"] in ("promoted", "refused")
        if decisions["3"] == "refused":
            assert results["3"].champion_before == "2"
        else:
            assert results["2"].champion_before == "3"


def test_failure_before_the_alias_move_keeps_the_old_champion(registry, monkeypatch):
    registry.set_registered_model_alias(NAME, "champion", "1")

    def broken(version):
        if str(version.version) == "2":
            raise RuntimeError("generator exploded mid-evaluation")
        return BASE

    with pytest.raises(RuntimeError, match="exploded"):
        promote(PromoteConfig(candidate="2"), evaluator=broken)
    assert champion(registry) == "1"

    # a failure inside the locked section (the registry write itself) also leaves v1 and frees the lock
    import mlflow

    def failing_set_alias(self, name, alias, version):
        raise ConnectionError("tracking server went away")

    with monkeypatch.context() as patched, pytest.raises(ConnectionError):
        patched.setattr(mlflow.MlflowClient, "set_registered_model_alias", failing_set_alias)
        promote(PromoteConfig(candidate="2"), evaluator=metrics_table({"1": BASE, "2": BEST}))
    assert champion(registry) == "1"
    assert "promotion.decision" not in registry.get_model_version(NAME, "2").tags
    assert NAME + PromotionLock.SUFFIX not in {m.name for m in registry.search_registered_models()}
    # and the next attempt goes through
    assert promote(PromoteConfig(candidate="2"), evaluator=metrics_table({"1": BASE, "2": BEST})).decision == "promoted"


# ---------------------------------------------------------------------------------------------
# The lock


def test_lock_is_exclusive_expires_and_reports_its_holder(registry):
    a = PromotionLock(registry, NAME, owner="a", ttl_s=60, wait_s=0)
    b = PromotionLock(registry, NAME, owner="b", ttl_s=60, wait_s=0.3, poll_s=0.05)
    with a:
        assert a.held() and not b.held()
        with pytest.raises(P.LockBusy, match="owner a"):
            b.acquire()
        b.release()                      # not ours: must not delete a's lock
        assert a.held()
    assert not a.held()
    # a crashed holder's expired lease is broken by the next promoter
    stale = PromotionLock(registry, NAME, owner="crashed", ttl_s=0.2, wait_s=0)
    stale.acquire()
    time.sleep(0.3)
    with b:
        assert b.held()


LOCK_WORKER = textwrap.dedent("""
    import sys, time, mlflow
    from pipeline.registry.promote import PromotionLock
    uri, counter, rounds = sys.argv[1], sys.argv[2], int(sys.argv[3])
    c = mlflow.MlflowClient(uri, registry_uri=uri)
    for _ in range(rounds):
        with PromotionLock(c, "reactdiff", ttl_s=60, wait_s=60, poll_s=0.1):
            n = int(open(counter).read())      # a read-modify-write that loses updates unless exclusive
            time.sleep(0.02)
            open(counter, "w").write(str(n + 1))
""")


def test_lock_serialises_processes(registry, mlflow_uri, tmp_path):
    counter = tmp_path / "counter"
    counter.write_text("0")
    script = tmp_path / "worker.py"
    script.write_text(LOCK_WORKER)
    procs = [subprocess.Popen([sys.executable, str(script), mlflow_uri, str(counter), "4"],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for _ in range(2)]
    for p in procs:
        out, _ = p.communicate(timeout=120)
        assert p.returncode == 0, out.decode()[-2000:]
    assert counter.read_text() == "8"
    assert NAME + PromotionLock.SUFFIX not in {m.name for m in registry.search_registered_models()}


# ---------------------------------------------------------------------------------------------
# The command


def test_promote_command_exit_codes(registry, monkeypatch, tmp_path):
    from jobs.cli import main

    table = {"1": BASE, "2": WORSE, "3": GOOD}
    monkeypatch.setattr(P, "default_evaluator", lambda cfg, candidate: metrics_table(table))
    assert main(["promote", "--candidate", "1"]) == 0 and champion(registry) == "1"
    gate = tmp_path / "gate.yaml"
    gate.write_text("FRCorr: {min_absolute_change: 0.0}\n")
    out = tmp_path / "decision.json"
    assert main(["promote", "--candidate", "2", "--gate", str(gate), "--out", str(out)]) == P.EXIT_REFUSED
    assert json.loads(out.read_text())["decision"] == "refused" and champion(registry) == "1"
    assert main(["promote", "--candidate", "3"]) == 0 and champion(registry) == "3"
    assert main(["promote", "--candidate", "3"]) == 0                   # no-op
    assert main(["promote", "--candidate", "9"]) == 1                   # unknown version: clear error
    # a lock held by someone else for longer than we wait: exit 4 (retry later)
    PromotionLock(registry, NAME, owner="other", ttl_s=600, wait_s=0).acquire()
    assert main(["promote", "--candidate", "2", "--set", "lock_wait_s=0"]) == P.EXIT_BUSY
