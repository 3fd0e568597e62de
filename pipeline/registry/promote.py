"""Promotion: evaluate ``challenger`` and ``champion`` on the same items and seeds, apply a metric
gate, and move the ``champion`` alias only when the gate passes.

The flow (``reactdiff promote``)::

    candidate (alias or version) ─┐
    current champion (alias)  ────┼─ evaluate both on one snapshot split, same seeds
                                  │  (cached per version in a model-version tag)
                                  ├─ gate: per-metric rules in the spirit of MetricThreshold
                                  └─ under the promotion lock: champion unchanged?  → move alias
                                                                 champion moved?    → start over

Outcomes and exit codes (for schedulers): ``promoted`` / ``first`` (no champion yet) / ``noop``
(the candidate already is champion) → 0; ``refused`` by the gate → 3; the lock could not be taken
or the champion kept moving → 4 (retry later); any other error → 1.

Safety properties:
- The alias move is the single commit point (one registry write). Anything that fails before it
  leaves the old champion serving; decision tags are written after it.
- Two promotions never both win against a stale champion: the expensive evaluations run outside
  the lock, and the short decide-and-move step runs inside it after re-reading the champion. If
  the champion changed meanwhile, the new champion is evaluated and the comparison redone.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import logging
import math
import os
import random
import socket
import time
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Mapping

from pipeline import runtime, storage
from pipeline.config import ConfigError, from_dict, option
from pipeline.errors import UserError
from pipeline.evaluate import records, scoring
from pipeline.evaluate.protocol import METRIC_DIRECTIONS
from pipeline.evaluate.scoring import EvalOptions
from pipeline.registry import runs as tracking
from pipeline.registry.models import RegistryError, load_generator, resolve_version

if TYPE_CHECKING:  # pragma: no cover
    from mlflow import MlflowClient
    from mlflow.entities.model_registry import ModelVersion

log = logging.getLogger(__name__)

EXIT_OK = 0          # promoted, first champion, or no-op
EXIT_REFUSED = 3     # the gate refused the candidate; the champion is unchanged
EXIT_BUSY = 4        # lock not acquired in time, or the champion kept moving: retry later

TAG = "promotion."   # prefix of the decision tags written on model versions


# ---------------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------------

@dataclass
class MetricGate:
    """One metric's rule, with the fields of ``mlflow.models.MetricThreshold``.

    For a greater-is-better metric the candidate passes when
    ``candidate >= threshold`` (absolute floor), ``candidate >= champion + min_absolute_change`` and
    ``candidate >= champion + min_relative_change * |champion|``; mirrored for lower-is-better.
    Unlike MLflow, ``min_absolute_change`` may be 0 ("not worse", the default) or negative (a
    tolerated regression): MetricThreshold only accepts positive values, so it cannot express the
    default gate "FRCorr not lower and FRDist not higher".
    """

    greater_is_better: bool | None = None   # None: the metric's known direction
    min_absolute_change: float | None = 0.0
    min_relative_change: float | None = None
    threshold: float | None = None

    def validate(self) -> None:
        if self.min_relative_change is not None and self.min_relative_change < 0:
            raise ConfigError(f"min_relative_change must be >= 0, got {self.min_relative_change}")


def default_gate() -> dict[str, MetricGate]:
    """FRCorr not lower and FRDist not higher than the champion's."""
    return {"FRCorr": MetricGate(greater_is_better=True), "FRDist": MetricGate(greater_is_better=False)}


@dataclass
class PromoteConfig:
    name: str = option("reactdiff", "registered model", flag="--name")
    candidate: str = option("challenger", "alias or version number to promote", flag="--candidate")
    champion: str = option("champion", "the serving alias to move", flag="--champion")
    features: str | None = option(None, "feature snapshot URI (default: the candidate's snapshot_uri tag, else "
                                        "the newest)", flag="--features", metavar="SNAPSHOT")
    split: str = option("val", "split to compare on (never select models on test)", flag="--split",
                        choices=["val", "test", "train"])
    evaluation: EvalOptions = field(default_factory=EvalOptions)   # the same seeds for both: a paired comparison
    gate: dict[str, MetricGate] = field(default_factory=default_gate)   # --gate FILE replaces it (module doc)
    reuse_evaluations: bool = option(True, "re-evaluate even if a version has metrics cached for this protocol "
                                           "in a version tag (reuse_evaluations=false)", flag="--no-cache",
                                     action="store_false")
    lock_ttl_s: float = option(300.0, "a crashed promoter's lock expires after this")
    lock_wait_s: float = option(600.0, "how long to wait for a concurrent promotion to finish")
    max_attempts: int = option(3, "re-comparisons when the champion moves during evaluation")
    out: str | None = option(None, "write the decision as JSON", flag="--out", metavar="FILE")
    ray_address: str | None = option(None, "Ray cluster to attach to (default: $RAY_ADDRESS, else local Ray "
                                           "on 127.0.0.1)", flag="--ray-address")

    def validate(self) -> None:
        if self.split not in ("train", "val", "test"):
            raise ConfigError(f"split must be train, val or test, got {self.split!r}")
        if not self.gate:
            raise ConfigError("gate: at least one metric rule is needed")
        unknown = sorted(set(self.gate) - set(METRIC_DIRECTIONS))
        if unknown:
            raise ConfigError(f"gate: unknown metric {unknown[0]!r} (known: {', '.join(METRIC_DIRECTIONS)})")
        if self.candidate == self.champion:
            raise ConfigError(f"candidate and champion aliases must differ (both {self.candidate!r})")
        if self.lock_ttl_s <= 0 or self.lock_wait_s < 0 or self.max_attempts < 1:
            raise ConfigError("lock_ttl_s must be > 0, lock_wait_s >= 0 and max_attempts >= 1")


def parse_gate(data: Mapping[str, Any]) -> dict[str, MetricGate]:
    """A gate YAML mapping (``{FRCorr: {min_absolute_change: 0.0}, ...}``, optionally under a
    top-level ``gate:`` key) → typed rules. A gate file replaces the whole default gate."""
    if "gate" in data and isinstance(data["gate"], Mapping):
        data = data["gate"]
    gate = {}
    for metric, rule in data.items():
        if not isinstance(rule, Mapping):
            raise ConfigError(f"gate.{metric}: expected a mapping of thresholds, got {rule!r}")
        gate[str(metric)] = from_dict(MetricGate, dict(rule), prefix=f"gate.{metric}")
    return gate


# ---------------------------------------------------------------------------------------------
# The gate
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class GateCheck:
    metric: str
    rule: str
    candidate: float | None
    champion: float | None
    passed: bool

    def __str__(self) -> str:
        verdict = "ok" if self.passed else "FAILED"
        return f"{self.metric}: {self.rule} [{verdict}]"


@dataclass(frozen=True)
class GateResult:
    passed: bool
    checks: tuple[GateCheck, ...]

    def summary(self) -> str:
        return "; ".join(str(c) for c in self.checks)


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.6g}"


def apply_gate(gate: Mapping[str, MetricGate], candidate: Mapping[str, float],
               champion: Mapping[str, float] | None) -> GateResult:
    """Check ``candidate`` against ``champion`` (None: only absolute thresholds apply).

    A missing or non-finite candidate metric fails its rule. The comparisons are those of
    ``mlflow.models.evaluation.validation`` (>= / <= with the change added or subtracted).
    """
    checks = []
    for metric, rule in gate.items():
        gib = rule.greater_is_better
        if gib is None:
            gib = METRIC_DIRECTIONS[metric]
        # Equality within float rounding counts as "not worse" (0.10 + 0.05 > 0.15 in binary).
        better_or_equal = (lambda a, b: a >= b or math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)) if gib \
            else (lambda a, b: a <= b or math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12))
        sign = 1.0 if gib else -1.0
        cand = candidate.get(metric)
        champ = None if champion is None else champion.get(metric)
        if cand is None or not math.isfinite(cand):
            checks.append(GateCheck(metric, f"candidate value {_fmt(cand)} is missing or not finite",
                                    cand, champ, False))
            continue
        op = ">=" if gib else "<="
        if rule.threshold is not None:
            checks.append(GateCheck(metric, f"{_fmt(cand)} {op} threshold {_fmt(rule.threshold)}",
                                    cand, champ, better_or_equal(cand, rule.threshold)))
        if champion is None:
            continue
        if champ is None or not math.isfinite(champ):
            # The champion could not be scored on this metric: nothing to compare against.
            checks.append(GateCheck(metric, f"champion value {_fmt(champ)} missing; comparison skipped",
                                    cand, champ, True))
            continue
        if rule.min_absolute_change is not None:
            bound = champ + sign * rule.min_absolute_change
            checks.append(GateCheck(
                metric, f"{_fmt(cand)} {op} champion {_fmt(champ)} {'+-'[sign < 0]} "
                        f"{_fmt(rule.min_absolute_change)} = {_fmt(bound)}",
                cand, champ, better_or_equal(cand, bound)))
        if rule.min_relative_change is not None:
            bound = champ + sign * rule.min_relative_change * abs(champ)
            checks.append(GateCheck(
                metric, f"{_fmt(cand)} {op} champion {_fmt(champ)} changed by "
                        f"{rule.min_relative_change:.3g}·|champion| = {_fmt(bound)}",
                cand, champ, better_or_equal(cand, bound)))
    return GateResult(all(c.passed for c in checks), tuple(checks))


# ---------------------------------------------------------------------------------------------
# The promotion lock
# ---------------------------------------------------------------------------------------------

class LockBusy(UserError, RuntimeError):
    """Another promotion holds the lock (the message names it and when its lease ends)."""

    exit_code = EXIT_BUSY


class PromotionLock:
    """A lease on the promotions of one registered model, held as a registered model.

    Why a registered model and not a tag or a lock file: the lock must be atomic where the state it
    protects lives. MLflow has no compare-and-set on tags — "set a tag, re-read it" lets two
    writers that both saw the lock free each read back their own value if their writes interleave
    (A sets, A reads, B sets, B reads). A lock file needs a shared filesystem with atomic create,
    which S3 offers only through conditional writes that not every S3-compatible store supports,
    and the promoters may not share a disk at all. Creating a registered model, by contrast, is an
    INSERT against a unique name in the registry database (sqlite, Postgres, MySQL behind the
    tracking server alike): exactly one of two concurrent creators succeeds, the other gets
    ``RESOURCE_ALREADY_EXISTS``. Deleting the model is the release.

    The lock model ``<name>.promotion-lock`` carries ``owner`` and ``expires_at`` (epoch seconds)
    tags. A crashed promoter's lease is broken by the next one once expired — re-read just before
    deleting so a fresh lease of someone else is left alone. The critical section (re-read the
    champion, move the alias, write tags) takes well under a second, so a TTL of minutes is ample;
    evaluations run outside the lock. Clocks of promoting hosts must agree to well within the TTL.
    Before the commit write the holder confirms with :meth:`held` that its lease is still its own.
    """

    SUFFIX = ".promotion-lock"

    def __init__(self, client: "MlflowClient", name: str, *, owner: str | None = None,
                 ttl_s: float = 300.0, wait_s: float = 600.0, poll_s: float = 0.25):
        self.client = client
        self.name = name
        self.lock_name = f"{name}{self.SUFFIX}"
        self.owner = owner or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.ttl_s = ttl_s
        self.wait_s = wait_s
        self.poll_s = poll_s

    def _holder(self) -> dict[str, str] | None:
        try:
            return dict(self.client.get_registered_model(self.lock_name).tags or {})
        except Exception as exc:
            if _error_code(exc) == "RESOURCE_DOES_NOT_EXIST":
                return None
            raise

    def _try_create(self) -> bool:
        expires = time.time() + self.ttl_s
        try:
            self.client.create_registered_model(
                self.lock_name,
                tags={"owner": self.owner, "expires_at": f"{expires:.3f}", "kind": "promotion-lock"},
                description=f"Promotion lock for registered model {self.name!r}; deleted on release. "
                            f"Safe to delete by hand once expires_at (epoch seconds) has passed.")
            return True
        except Exception as exc:
            # ALREADY_EXISTS: taken. DOES_NOT_EXIST: taken and released between the failed insert
            # and MLflow's follow-up read. sqlite's "database is locked": a concurrent writer.
            if _error_code(exc) in ("RESOURCE_ALREADY_EXISTS", "RESOURCE_DOES_NOT_EXIST") \
                    or "database is locked" in str(exc):
                return False
            raise

    def acquire(self) -> "PromotionLock":
        deadline = time.monotonic() + self.wait_s
        while True:
            if self._try_create():
                log.debug("promotion lock %s taken by %s", self.lock_name, self.owner)
                return self
            holder = self._holder()
            if holder is not None and float(holder.get("expires_at", "0")) < time.time():
                self._break(holder)
                continue
            if time.monotonic() >= deadline:
                who = holder.get("owner", "?") if holder else "?"
                until = holder.get("expires_at") if holder else None
                when = dt.datetime.fromtimestamp(float(until)).isoformat(timespec="seconds") if until else "?"
                raise LockBusy(f"another promotion of {self.name!r} holds the lock (owner {who}, lease "
                               f"until {when}); waited {self.wait_s:.0f}s. Retry later, or delete the "
                               f"registered model {self.lock_name!r} if that promoter is gone.")
            time.sleep(self.poll_s * (0.5 + random.random()))

    def _break(self, stale: dict[str, str]) -> None:
        again = self._holder()
        if again is None or again.get("owner") != stale.get("owner") \
                or again.get("expires_at") != stale.get("expires_at"):
            return  # released or re-taken meanwhile: not stale any more
        log.warning("breaking the expired promotion lock of %s (owner %s)", self.name, stale.get("owner"))
        self._delete()

    def _delete(self) -> None:
        try:
            self.client.delete_registered_model(self.lock_name)
        except Exception as exc:
            if _error_code(exc) != "RESOURCE_DOES_NOT_EXIST":
                raise

    def held(self) -> bool:
        """True if the lock exists, is ours and has not expired (re-read from the registry)."""
        holder = self._holder()
        return bool(holder and holder.get("owner") == self.owner
                    and float(holder.get("expires_at", "0")) > time.time())

    def release(self) -> None:
        holder = self._holder()
        if holder is not None and holder.get("owner") == self.owner:
            self._delete()

    def __enter__(self) -> "PromotionLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _error_code(exc: Exception) -> str:
    return str(getattr(exc, "error_code", "") or "")


# ---------------------------------------------------------------------------------------------
# Registry helpers
# ---------------------------------------------------------------------------------------------

def _alias_version(c: "MlflowClient", name: str, alias: str) -> "ModelVersion | None":
    """The version ``alias`` points to, or None if the alias is not set."""
    try:
        return c.get_model_version_by_alias(name, alias)
    except Exception as exc:
        # "Registered model alias champion not found." (INVALID_PARAMETER_VALUE on sqlite stores)
        if _error_code(exc) in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE") \
                and "alias" in str(exc).lower():
            return None
        raise


def resolve_candidate(c: "MlflowClient", name: str, ref: str) -> "ModelVersion":
    """``ref`` is an alias (``challenger``), a version number (``3``) or ``models:/name/3|@alias``."""
    if ref.startswith("models:/"):
        version = resolve_version(ref)
        if version is None:
            raise RegistryError(f"{ref!r} is not a registry version URI")
        return version
    uri = f"models:/{name}/{ref}" if ref.isdigit() else f"models:/{name}@{ref}"
    return resolve_version(uri)


def _v(version: "ModelVersion | None") -> str | None:
    """A version's number as a string (MLflow returns int or str depending on the call)."""
    return None if version is None else str(version.version)


def _version_label(v: "ModelVersion | None") -> str:
    return "none" if v is None else f"v{v.version}"


# ---------------------------------------------------------------------------------------------
# Evaluating one version (the default evaluator; tests inject their own)
# ---------------------------------------------------------------------------------------------

Evaluator = Callable[["ModelVersion"], Mapping[str, float]]


def default_evaluator(cfg: PromoteConfig, candidate: "ModelVersion") -> Evaluator:
    """Evaluate versions on the snapshot of ``cfg.features`` or the candidate's ``snapshot_uri`` tag."""
    runtime.init_ray(cfg.ray_address)
    return registry_evaluator(cfg, scoring.open_snapshot(cfg.features, candidate))


def registry_evaluator(cfg: PromoteConfig, snapshot) -> Evaluator:
    """Evaluate a version with :func:`pipeline.evaluate.scoring.evaluate_generator`; metrics are cached
    in a version tag per protocol (``pipeline.evaluate.records.evaluation_tag``), also by
    ``reactdiff evaluate``."""
    options = cfg.evaluation

    def run(version: "ModelVersion") -> Mapping[str, float]:
        cached = records.cached_evaluation(version, cfg.split, snapshot.id, options) if cfg.reuse_evaluations else None
        if cached is not None:
            log.info("%s v%s: reusing cached %s metrics", version.name, version.version, cfg.split)
            return cached
        uri = f"models:/{version.name}/{_v(version)}"
        log.info("evaluating %s on %s/%s (%d samples, seed %d)", uri, snapshot.id, cfg.split,
                 options.samples, options.seed)
        generator, _ = load_generator(uri)
        report = scoring.evaluate_generator(generator, snapshot, cfg.split, options, baselines=(), model_uri=uri,
                                            model_version=version)
        records.log_report(report, version=version, snapshot_uri=snapshot.uri)
        records.record_evaluation(version, report, options)
        return report.metrics

    return run


# ---------------------------------------------------------------------------------------------
# Promotion
# ---------------------------------------------------------------------------------------------

@dataclass
class PromotionResult:
    decision: str                          # promoted | first | refused | noop
    name: str
    candidate: str                         # version number
    champion_before: str | None
    champion_after: str | None
    candidate_metrics: dict[str, float] = field(default_factory=dict)
    champion_metrics: dict[str, float] | None = None
    gate: list[str] = field(default_factory=list)
    message: str = ""

    @property
    def exit_code(self) -> int:
        return EXIT_REFUSED if self.decision == "refused" else EXIT_OK

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self) | {"exit_code": self.exit_code}


class PromotionConflict(UserError, RuntimeError):
    """The champion moved during every attempt (other promotions kept winning)."""

    exit_code = EXIT_BUSY


def _metrics_json(m: Mapping[str, float] | None) -> str:
    return json.dumps(None if m is None else {k: float(v) for k, v in m.items()}, sort_keys=True)


def _record(c: "MlflowClient", result: PromotionResult, owner: str) -> None:
    """Decision tags on the candidate (and on the champion it was compared with), plus a
    description line on the candidate. Written after the alias move; purely informational."""
    now = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    tags = {
        "decision": result.decision,
        "time": now,
        "champion": result.champion_before or "none",
        "gate": " | ".join(result.gate) or "no comparison",
        "candidate_metrics": _metrics_json(result.candidate_metrics),
        "champion_metrics": _metrics_json(result.champion_metrics),
        "owner": owner,
    }
    for k, v in tags.items():
        c.set_model_version_tag(result.name, result.candidate, TAG + k, v)
    if result.champion_before and result.champion_before != result.candidate:
        c.set_model_version_tag(result.name, result.champion_before, f"{TAG}challenged_by.v{result.candidate}",
                                f"{result.decision} at {now}")
        if result.decision == "promoted":
            c.set_model_version_tag(result.name, result.champion_before, TAG + "replaced_by", result.candidate)
    line = (f"[promotion {now}] {result.decision} vs champion "
            f"{'v' + result.champion_before if result.champion_before else 'none'}: {result.message}")
    current = c.get_model_version(result.name, result.candidate).description or ""
    kept = "\n".join(ln for ln in current.splitlines() if not ln.startswith("[promotion "))
    c.update_model_version(result.name, result.candidate, description=(kept.rstrip() + "\n" + line).strip())


def _metric_summary(cand: Mapping[str, float], champ: Mapping[str, float] | None,
                    metrics: list[str]) -> str:
    parts = []
    for m in metrics:
        if champ is None:
            parts.append(f"{m} {_fmt(cand.get(m))}")
        else:
            parts.append(f"{m} {_fmt(cand.get(m))} vs {_fmt(champ.get(m))}")
    return ", ".join(parts)


def promote(cfg: PromoteConfig, *, evaluator: Evaluator | None = None,
            owner: str | None = None) -> PromotionResult:
    """Gate the candidate against the current champion and move the alias if it passes.

    ``evaluator(version) -> metrics`` is the seam for tests; by default each version is evaluated
    with :func:`pipeline.evaluate.scoring.evaluate_generator` (cached per protocol in a version tag).
    """
    c = tracking.client()
    if cfg.split == "test":
        log.warning("promoting on the test split: model selection on test overfits it (use val)")
    candidate = resolve_candidate(c, cfg.name, cfg.candidate)
    lock = PromotionLock(c, cfg.name, owner=owner, ttl_s=cfg.lock_ttl_s, wait_s=cfg.lock_wait_s)
    if evaluator is None:
        evaluator = default_evaluator(cfg, candidate)
    metrics_shown = list(cfg.gate)
    cache: dict[str, Mapping[str, float]] = {}

    def evaluate(version: "ModelVersion") -> dict[str, float]:
        if _v(version) not in cache:
            cache[_v(version)] = dict(evaluator(version))
        return dict(cache[_v(version)])

    for attempt in range(1, cfg.max_attempts + 1):
        champion = _alias_version(c, cfg.name, cfg.champion)
        if _v(champion) == _v(candidate):
            return _noop(cfg, candidate)
        cand_metrics = evaluate(candidate)
        champ_metrics = evaluate(champion) if champion is not None else None
        gate = apply_gate(cfg.gate, cand_metrics, champ_metrics)

        with lock:
            current = _alias_version(c, cfg.name, cfg.champion)
            if _v(current) != _v(champion):
                log.warning("champion of %s moved from %s to %s during evaluation (attempt %d/%d); "
                            "comparing against the new champion", cfg.name, _version_label(champion),
                            _version_label(current), attempt, cfg.max_attempts)
                continue
            if champion is None:
                decision = "first" if gate.passed else "refused"
            else:
                decision = "promoted" if gate.passed else "refused"
            message = _metric_summary(cand_metrics, champ_metrics, metrics_shown)
            if not gate.passed:
                message += " — gate: " + "; ".join(str(ch) for ch in gate.checks if not ch.passed)
            result = PromotionResult(
                decision=decision, name=cfg.name, candidate=_v(candidate), champion_before=_v(champion),
                champion_after=_v(candidate) if gate.passed else _v(champion),
                candidate_metrics=cand_metrics, champion_metrics=champ_metrics,
                gate=[str(ch) for ch in gate.checks], message=message)
            if gate.passed:
                if not lock.held():
                    raise LockBusy(f"lost the promotion lock of {cfg.name!r} before moving "
                                   f"@{cfg.champion} (lease of {cfg.lock_ttl_s:.0f}s expired?); nothing changed")
                # The commit point: one registry write. Everything before it leaves the old champion.
                c.set_registered_model_alias(cfg.name, cfg.champion, _v(candidate))
            _record(c, result, lock.owner)
        log.info("%s v%s: %s (%s)", cfg.name, candidate.version, decision, message)
        return result
    raise PromotionConflict(f"the champion of {cfg.name!r} changed during each of {cfg.max_attempts} "
                            "attempts (concurrent promotions); retry later")


def _noop(cfg: PromoteConfig, candidate: "ModelVersion") -> PromotionResult:
    return PromotionResult(
        decision="noop", name=cfg.name, candidate=_v(candidate),
        champion_before=_v(candidate), champion_after=_v(candidate),
        message=f"{cfg.name} v{candidate.version} (@{cfg.candidate}) already is @{cfg.champion}; nothing to do")


def dry_run(cfg: PromoteConfig) -> str:
    """The plan of ``promote(cfg)``: candidate, the champion it would be compared with, the
    snapshot split, whether each has cached metrics for this protocol, and the gate. Reads the
    registry only: no evaluation, no lock, no alias or tag is written."""
    c = tracking.client()
    candidate = resolve_candidate(c, cfg.name, cfg.candidate)
    champion = _alias_version(c, cfg.name, cfg.champion)
    snapshot = scoring.open_snapshot(cfg.features, candidate)

    def metrics(v: "ModelVersion") -> str:
        cached = records.cached_evaluation(v, cfg.split, snapshot.id, cfg.evaluation)
        return (", ".join(f"{k} {_fmt(cached.get(k))}" for k in cfg.gate) + " (cached)") if cached \
            else f"would be evaluated ({cfg.evaluation.samples} samples, seed {cfg.evaluation.seed})"

    lines = [f"promote (dry run): {cfg.name} {_version_label(candidate)} (@{cfg.candidate}) on "
             f"{snapshot.id}/{cfg.split}", f"  candidate: {metrics(candidate)}"]
    if champion is None:
        lines.append(f"  no @{cfg.champion} yet: the candidate would become the first if it meets the absolute rules")
    elif _v(champion) == _v(candidate):
        lines.append(f"  the candidate already is @{cfg.champion}: nothing to do")
    else:
        lines.append(f"  compared with @{cfg.champion} {_version_label(champion)}: {metrics(champion)}")
    lines.append("  gate: " + "; ".join(f"{k} " + ", ".join(f"{f} {v}" for f, v in vars(g).items() if v is not None)
                                        for k, g in cfg.gate.items()))
    return "\n".join(lines)


def run_promotion(cfg: PromoteConfig) -> PromotionResult:
    """The job: promote, print the decision, optionally write it as JSON."""
    result = promote(cfg)
    print(format_result(result))
    if cfg.out:
        storage.write_json(cfg.out, result.to_dict())
    return result


def format_result(result: PromotionResult) -> str:
    head = {
        "promoted": f"PROMOTED {result.name} v{result.candidate} to champion (was v{result.champion_before})",
        "first": f"FIRST CHAMPION {result.name} v{result.candidate} (there was no champion)",
        "refused": f"REFUSED {result.name} v{result.candidate}; champion stays "
                   f"{'v' + result.champion_before if result.champion_before else 'unset'}",
        "noop": f"NO-OP {result.message}",
    }[result.decision]
    lines = [head]
    if result.decision != "noop":
        names = sorted(set(result.candidate_metrics) | set(result.champion_metrics or {}),
                       key=lambda m: list(METRIC_DIRECTIONS).index(m) if m in METRIC_DIRECTIONS else 99)
        lines.append(f"  {'metric':<8} {'candidate':>12} {'champion':>12}")
        for m in names:
            champ = None if result.champion_metrics is None else result.champion_metrics.get(m)
            lines.append(f"  {m:<8} {_fmt(result.candidate_metrics.get(m)):>12} {_fmt(champ):>12}")
        lines += [f"  gate: {g}" for g in result.gate]
    return "\n".join(lines)
