"""What the reliability suite tried and what happened, printed at the end of the run.

Tests call :func:`case` once per input or fault with the observed outcome (quarantined with
reason / rejected with message / retried N times / resumed from epoch E / refused ...) and
:func:`rows` once per extraction run with its clip accounting. ``conftest.py`` prints the table
in ``pytest_terminal_summary`` next to each test's pytest outcome (passed, or xfailed for a
known bug with its reason), so the figures quoted in docs/reliability.md come from a real run.
"""

from __future__ import annotations

from dataclasses import dataclass, field

INPUT, FAULT, SECURITY = "input", "fault", "security"

# Checks this suite does not repeat because another suite already makes them (figures list them).
COVERED_ELSEWHERE = [
    ("fault", "train worker raises at an epoch (debug.fail_at_epoch) -> group restarts from checkpoint",
     "tests/train/test_train_pipeline.py::test_stage1_resumes_by_name_and_after_a_worker_failure"),
    ("fault", "re-running a finished run adds no epoch and no model version",
     "tests/train/test_train_pipeline.py::test_rerunning_a_finished_run_adds_no_epoch_and_no_version"),
    ("fault", "promotions racing in threads compare against the latest champion",
     "tests/evaluate/test_promote.py::test_concurrent_promotions_compare_against_the_latest_champion"),
    ("fault", "failure before / during the alias move keeps the old champion, frees the lock",
     "tests/evaluate/test_promote.py::test_failure_before_the_alias_move_keeps_the_old_champion"),
    ("fault", "promotion lock: exclusive, expires, serialises processes",
     "tests/evaluate/test_promote.py::test_lock_is_exclusive_expires_and_reports_its_holder"),
    ("fault", "snapshot above max_failure_fraction is not published; a bare folder is skipped by latest",
     "tests/extract/test_extract.py::test_broken_clips_are_quarantined_and_the_others_extracted"),
    ("input", "split csv paths with '..', absolute or '\\' parts (reader level)",
     "tests/data/test_react_layout.py (parametrised bad paths)"),
    ("security", "local Ray listens on 127.0.0.1 only (ss over every Ray process)",
     "tests/test_runtime.py::test_local_ray_listens_on_loopback_only"),
    ("security", "loopback even when Ray was imported before the variables were set",
     "tests/test_runtime.py::test_loopback_even_without_env_and_with_early_ray_import"),
    ("security", "ray_cluster.yaml: dashboard on 127.0.0.1, token auth on every node, no keys in the file",
     "tests/infra/test_infra_cluster_yaml.py"),
    ("security", "k8s: ClusterIP only, no Ingress/NodePort/hostPort, default-deny NetworkPolicy, token auth",
     "tests/infra/test_infra_manifests.py"),
    ("security", "local stack: every listener on loopback, job API refuses requests without the token",
     "tests/infra/test_infra_local_stack.py"),
    ("security", "TorchScript/wav2vec2 file sha256 recorded in the manifest; a network needs --model NAME=URI",
     "tests/extract/test_extract.py::test_network_extractors_run_in_actor_pools_with_av_alignment"),
    ("security", "a model file swapped after the driver hashed it is refused before a worker loads it",
     "tests/extract/test_features.py::test_torchscript_width_mismatch_and_changed_file_are_errors"),
    ("security", "a generator file holding a pickled object is refused (registry.load_generator)",
     "tests/train/test_train_registry.py::test_a_pickled_object_is_refused"),
    ("security", ".npy files never unpickle; redact() hides AWS secrets",
     "tests/test_storage.py"),
]


@dataclass
class Case:
    kind: str
    name: str
    outcome: str
    nodeid: str
    detail: str = ""


@dataclass
class Rows:
    run: str
    considered: int
    ok: int
    quarantined: int

    @property
    def lost(self) -> int:
        return self.considered - self.ok - self.quarantined


@dataclass
class Report:
    cases: list[Case] = field(default_factory=list)
    rows: list[Rows] = field(default_factory=list)
    outcomes: dict[str, str] = field(default_factory=dict)       # nodeid -> passed/failed/xfailed/...
    xfail_reasons: dict[str, str] = field(default_factory=dict)


REPORT = Report()


def case(kind: str, name: str, outcome: str, *, nodeid: str, detail: str = "") -> None:
    REPORT.cases.append(Case(kind, name, outcome, nodeid, detail))


def rows(run: str, considered: int, ok: int, quarantined: int) -> None:
    REPORT.rows.append(Rows(run, considered, ok, quarantined))


def _short(text: str, limit: int) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: max(0, limit - 1)] + "…"


def render(width: int = 180) -> list[str]:
    """The summary table (empty when no reliability test ran)."""
    r = REPORT
    if not r.cases and not r.rows:
        return []
    inputs = [c for c in r.cases if c.kind == INPUT]
    faults = [c for c in r.cases if c.kind == FAULT]
    security = [c for c in r.cases if c.kind == SECURITY]
    considered = sum(x.considered for x in r.rows)
    ok = sum(x.ok for x in r.rows)
    quarantined = sum(x.quarantined for x in r.rows)
    lost = sum(x.lost for x in r.rows)
    xfailed = sorted(n for n, o in r.outcomes.items() if o == "xfailed")
    lines = [
        f"inputs tried: {len(inputs)}   faults injected: {len(faults)}   security checks: {len(security)}   "
        f"rows lost: {lost}   known bugs (strict xfail): {len(xfailed)}",
        f"clips considered {considered} = extracted {ok} + quarantined {quarantined} + lost {lost}, "
        f"over {len(r.rows)} extraction runs:",
    ]
    for run in r.rows:
        lines.append(f"  {_short(run.run, 52):<52} considered {run.considered:>3}  ok {run.ok:>3}  "
                     f"quarantined {run.quarantined:>3}  lost {run.lost}")
    lines.append(f"  {'kind':<8} {'test':<5} {'case':<50} outcome")
    for items in (inputs, faults, security):
        for c in items:
            status = r.outcomes.get(c.nodeid, "not run")
            mark = {"passed": "ok", "xfailed": "XFAIL", "failed": "FAIL", "skipped": "skip"}.get(status, status)
            outcome = c.outcome + (f"  ({c.detail})" if c.detail else "")
            lines.append(f"  {c.kind:<8} {mark:<5} {_short(c.name, 50):<50} {_short(outcome, width - 68)}")
    for nodeid in xfailed:
        lines.append(f"  bug: {nodeid.split('::')[-1]}")
        lines.append(f"       {_short(r.xfail_reasons.get(nodeid, ''), width - 7)}")
    lines.append("covered by other suites (not repeated here):")
    for kind, what, where in COVERED_ELSEWHERE:
        lines.append(f"  {kind:<8} {_short(what, 96):<96} [{where}]")
    return lines
