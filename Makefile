# The two commands the README leads with. Both create .venv on first use (pip, pinned by
# constraints.txt) and reuse it afterwards.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed

# The test suite only: dead proxies keep it hermetic (no cloud-metadata probes, nothing leaves
# loopback; DESIGN.md §3). Not for demo/bench: the library binds local Ray to loopback itself
# and jobs must be able to reach real S3 and MLflow. pip needs the real network too.
HERMETIC := env RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 RAY_USAGE_STATS_ENABLED=0 \
	MLFLOW_DISABLE_TELEMETRY=true NO_PROXY=127.0.0.1,localhost no_proxy=127.0.0.1,localhost \
	HTTP_PROXY=http://127.0.0.1:9 HTTPS_PROXY=http://127.0.0.1:9 \
	http_proxy=http://127.0.0.1:9 https_proxy=http://127.0.0.1:9
PIP := env -u HTTP_PROXY -u HTTPS_PROXY -u http_proxy -u https_proxy $(BIN)/python -m pip

.PHONY: demo test bench bench-quick venv clean

demo: $(STAMP)
	$(BIN)/reactdiff demo

test: $(STAMP)
	$(HERMETIC) RAY_AUTH_MODE=disabled $(BIN)/python -m pytest $(PYTEST_ARGS)

bench: $(STAMP)
	$(BIN)/python -m benchmarks.run

bench-quick: $(STAMP)
	$(BIN)/python -m benchmarks.run --quick

venv: $(STAMP)

# pip byte-compiles what it installs (about a third of the install). Keep it: where
# PYTHONDONTWRITEBYTECODE=1 (many containers) nothing is cached on import, and every Ray worker
# would compile torch, Ray and MLflow from source — 15 s instead of 7 s per process, measured.
$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet -c constraints.txt -e '.[test]'
	$(BIN)/python -c 'import reactdiff.dtw as d; d.compile_kernels()'   # numba's cache, once
	touch $(STAMP)

clean:
	rm -rf .reactdiff
