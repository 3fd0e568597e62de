#!/usr/bin/env bash
# The issue-15 outside check through the CLI, as a new user runs it: a REACT-layout synthetic
# dataset (20/6/6 dyads, seed 11) of behaviour model $1 → extract → train both stages with
# `train`'s default preset at the demo's optimiser-step budget (stage 1: 24 epochs × 20 steps of
# 2 clips = 480; stage 2: 40 × 10 of 4 items = 400) → generate --split val → evaluate.
#   benchmarks/cli_check.sh contagion [WORKDIR]      # after `make venv`; ~20 min on 2 cores
# Prints the metrics table, the jitter ratio against the real listeners and each step's time.
set -euo pipefail
behaviour=${1:?usage: benchmarks/cli_check.sh prototype|backchannel|contagion [WORKDIR]}
repo=$(cd "$(dirname "$0")/.." && pwd)
B=$repo/.venv/bin/reactdiff
export REACTDIFF_HOME=${2:-$repo/.reactdiff/cli-check-$behaviour}
mkdir -p "$REACTDIFF_HOME" && cd "$REACTDIFF_HOME"
t0=$(date +%s)
$B synth --out "$REACTDIFF_HOME/data" --dyads 20,6,6 --seed 11 --behaviour "$behaviour"
$B extract --data "$REACTDIFF_HOME/data"
t1=$(date +%s)
$B train --stage autoencoder --epochs 24 --batch-size 2 --set checkpoint.every=6 --set validation.every=6
t2=$(date +%s)
$B train --stage diffusion --epochs 40 --batch-size 4 --set checkpoint.every=10 --set validation.every=10 \
    --json > diffusion.json
t3=$(date +%s)
model=$("$repo/.venv/bin/python" -c "import json, sys; t = open('diffusion.json').read(); \
print(json.loads(t[t.index('{'):t.rindex('}') + 1])['model_uri'])")
$B generate --split val --model "$model" --out "$REACTDIFF_HOME/pred"
t4=$(date +%s)
$B evaluate --predictions "$REACTDIFF_HOME/pred" --split val --out "$REACTDIFF_HOME/report.json"
t5=$(date +%s)
PYTHONPATH=$repo "$repo/.venv/bin/python" - "$REACTDIFF_HOME" <<'PY'
import glob, sys
import numpy as np
from benchmarks.quality import jitter          # the quality benchmark's definition
from pipeline.data.snapshot import Snapshot
from pipeline.evaluate.predictions import read_predictions
home = sys.argv[1]
snap = Snapshot.open(sorted(glob.glob(f"{home}/snapshots/2*"))[-1])
items = list(snap.items("val"))
pred = read_predictions(f"{home}/pred")                     # [N, K, T, 25] in item order
clips = snap.load_clips(sorted({i.listener for i in items}), ["emotion"])
real = np.stack([np.asarray(clips[i.listener]["emotion"])[:pred.shape[2]] for i in items[:len(pred)]])
print(f"jitter vs the real listeners: {jitter(pred) / jitter(real):.2f}x")
PY
echo "seconds: synth+extract $((t1 - t0)), stage 1 $((t2 - t1)), stage 2 $((t3 - t2)), generate $((t4 - t3)), evaluate $((t5 - t4))"
