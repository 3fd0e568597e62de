"""Registry faults across processes (tests/evaluate/test_promote.py covers threads, the lock alone
across processes, and in-process failures): three promoter *processes* racing leave exactly one
champion, the best one; a promoter SIGKILLed at its commit point leaves the old champion serving,
and the next promotion breaks its expired lock."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import faults as F
from tests.helpers import report as R

NAME = "reactdiff"
REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow
TABLE = {"1": {"FRCorr": 0.10, "FRDist": 90.0}, "2": {"FRCorr": 0.30, "FRDist": 80.0},
         "3": {"FRCorr": 0.20, "FRDist": 85.0}, "4": {"FRCorr": 0.25, "FRDist": 82.0},
         "5": {"FRCorr": 0.40, "FRDist": 70.0}}

PROMOTER = """
import json, os, sys, time
import mlflow
from pipeline.registry.promote import PromoteConfig, promote
candidate, table, go, mode, ttl = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3], sys.argv[4], float(sys.argv[5])
if mode == "die-at-commit":                      # stop dead at the single commit write
    def at_commit(self, name, alias, version):
        print("AT_COMMIT", flush=True)
        time.sleep(600)
    mlflow.MlflowClient.set_registered_model_alias = at_commit
print("READY", flush=True)
while not os.path.exists(go):
    time.sleep(0.005)
result = promote(PromoteConfig(candidate=candidate, lock_wait_s=120, lock_ttl_s=ttl, max_attempts=5),
                 evaluator=lambda v: table[str(v.version)])
print("RESULT " + json.dumps(result.to_dict()), flush=True)
"""


def _champion(c) -> str | None:
    try:
        return str(c.get_model_version_by_alias(NAME, "champion").version)
    except Exception:
        return None


def _start(tmp: Path, script: Path, candidate: str, go: Path, mode: str = "promote", ttl: float = 60):
    out = tmp / f"promoter-{candidate}-{mode}.log"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with open(out, "wb") as f:
        proc = subprocess.Popen([sys.executable, str(script), candidate, json.dumps(TABLE), str(go), mode, str(ttl)],
                                cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT)
    return proc, out


def test_promoter_processes_racing_or_dying_leave_one_consistent_champion(mlflow_uri, tmp_path, request):
    import mlflow

    from pipeline.registry.promote import PromoteConfig, PromotionLock, promote

    c = mlflow.MlflowClient(mlflow_uri, registry_uri=mlflow_uri)
    c.create_registered_model(NAME)
    src = tmp_path / "model"
    src.mkdir()
    for _ in TABLE:
        c.create_model_version(NAME, source=str(src))
    c.set_registered_model_alias(NAME, "champion", "1")
    script = tmp_path / "promoter.py"
    script.write_text(PROMOTER)

    # 1. three promoters, each better than v1, released at the same instant
    go = tmp_path / "go"
    procs = {v: _start(tmp_path, script, v, go) for v in ("2", "3", "4")}
    F.wait_for(lambda: all("READY" in out.read_text() or p.poll() is not None for p, out in procs.values()),
               180, 0.1, "the promoters to start")
    go.write_text("")
    results = {}
    for v, (p, out) in procs.items():
        p.wait(180)
        text = out.read_text()
        assert p.returncode == 0, text[-3000:]
        results[v] = json.loads(text.split("RESULT ", 1)[1].splitlines()[0])
    decisions = {v: r["decision"] for v, r in results.items()}
    R.case(R.FAULT, "3 promoter processes racing (v2, v3, v4 beat v1)",
           f"one champion: v{_champion(c)} (the best); decisions {decisions}", nodeid=request.node.nodeid)
    assert _champion(c) == "2"
    # every promotion moved the alias from the champion it compared against: a chain v1 -> ... -> v2
    moves = {r["champion_before"]: v for v, r in results.items() if r["decision"] == "promoted"}
    chain, at = ["1"], "1"
    while at in moves:
        at = moves.pop(at)
        chain.append(at)
    assert chain[-1] == "2" and not moves, (chain, moves)
    for v, r in results.items():
        if r["decision"] == "refused":
            assert r["champion_before"] in chain and TABLE[r["champion_before"]]["FRCorr"] > TABLE[v]["FRCorr"]
    assert NAME + PromotionLock.SUFFIX not in {m.name for m in c.search_registered_models()}

    # 2. a promoter of v5 SIGKILLed at its commit point (lock held, alias not yet moved)
    go2 = tmp_path / "go2"
    go2.write_text("")
    proc, out = _start(tmp_path, script, "5", go2, mode="die-at-commit", ttl=4)
    try:
        F.wait_for(lambda: "AT_COMMIT" in out.read_text() or proc.poll() is not None, 180, 0.1, "the commit point")
        assert proc.poll() is None, out.read_text()[-3000:]
        F.kill_own(proc.pid)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert _champion(c) == "2"                                     # the old champion keeps serving
    lock = c.get_registered_model(NAME + PromotionLock.SUFFIX)     # the dead promoter's lease is left behind
    t0 = time.monotonic()
    result = promote(PromoteConfig(candidate="5", lock_wait_s=60), evaluator=lambda v: TABLE[str(v.version)])
    waited = time.monotonic() - t0
    R.case(R.FAULT, "promoter SIGKILLed at its commit point",
           f"champion stayed v2; its expired lock was broken after {waited:.1f}s and v5 promoted",
           nodeid=request.node.nodeid, detail=f"lock owner {lock.tags.get('owner')}")
    assert result.decision == "promoted" and result.champion_before == "2" and _champion(c) == "5"
    assert NAME + PromotionLock.SUFFIX not in {m.name for m in c.search_registered_models()}
