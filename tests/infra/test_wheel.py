"""The package as users get it: a wheel built with `pip wheel .`, installed outside the repository,
runs `reactdiff synth` and `reactdiff extract --feature-set demo` (feature sets and bundled configs
are package data, nothing is read from a checkout).

The wheel is built from a copy of the packaged files (no build/ or egg-info left in the checkout)
with --no-deps --no-build-isolation (no index needed) and installed with --target into a folder
put first on PYTHONPATH: the dependencies come from this venv, the code only from the wheel.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PACKAGED = ("pyproject.toml", "README.md", "LICENSE", "reactdiff", "pipeline", "jobs")

pytestmark = pytest.mark.slow   # a wheel build, a local Ray start and an extraction: ~1 min


def _run(argv: list[str], cwd: Path, env: dict[str, str] | None = None) -> str:
    proc = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{' '.join(map(str, argv))}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    """(folder the wheel is installed in, environment that imports the package from there only)."""
    tmp = tmp_path_factory.mktemp("wheel")
    source = tmp / "source"
    for name in PACKAGED:
        src = REPO / name
        if src.is_dir():
            shutil.copytree(src, source / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        else:
            source.mkdir(exist_ok=True)
            shutil.copy2(src, source / name)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input"]
    _run([*pip, "wheel", str(source), "--no-deps", "--no-build-isolation", "--no-index", "-w", str(tmp / "dist")],
         cwd=tmp)
    wheel = next((tmp / "dist").glob("reactdiff_pipeline-*.whl"))
    site = tmp / "site"
    _run([*pip, "install", "--no-deps", "--no-index", "--target", str(site), str(wheel)], cwd=tmp)
    # MLflow explicitly in the test's folder: the extraction logs a run, and nothing may land in
    # the repository (a run of the suite once left mlflow.db in the clone's root from here).
    env = {**os.environ, "PYTHONPATH": str(site), "REACTDIFF_HOME": str(tmp / "home"),
           "MLFLOW_TRACKING_URI": f"sqlite:///{tmp / 'mlflow.db'}"}
    return site, env


def test_wheel_runs_synth_and_demo_extraction_outside_the_repository(installed, tmp_path):
    site, env = installed
    where = _run([sys.executable, "-c", "import jobs, pipeline, reactdiff; "
                  "print(pipeline.__file__, jobs.__file__, reactdiff.__file__, sep='\\n')"], cwd=tmp_path, env=env)
    for path in where.split():
        assert Path(path).is_relative_to(site), f"imported from {path}, not from the installed wheel"
    reactdiff = site / "bin" / "reactdiff"   # the console script of the wheel

    data, snapshots = tmp_path / "data", tmp_path / "snapshots"
    out = _run([str(reactdiff), "synth", "--out", str(data), "--dyads", "1,1,1", "--frames", "50"], cwd=tmp_path,
               env=env)
    assert "6 person clips" in out
    out = _run([str(reactdiff), "extract", "--data", str(data), "--out", str(snapshots), "--feature-set", "demo",
                "--json"], cwd=tmp_path, env=env)
    assert '"published": true' in out
    assert env["MLFLOW_TRACKING_URI"] in out     # the extraction's MLflow run went where it was told
    assert len([p for p in snapshots.iterdir() if p.is_dir()]) == 1
