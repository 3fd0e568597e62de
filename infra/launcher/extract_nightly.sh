#!/usr/bin/env bash
# Nightly incremental feature extraction on a `ray up` cluster (ray_cluster.yaml), run by cron
# on the head node. It submits to the head's own job API (127.0.0.1:8265, token from
# ~/.ray/auth_token), waits for the job and exits with its status.
#
#   * one run at a time: a run still going makes the next one exit 0 without submitting
#   * one run per day: the submission id is extract-<UTC date>; Ray refuses a second one
#   * incremental: --set incremental_from=latest carries over unchanged clips
#
# Settings (environment, or the file $REACTDIFF_NIGHTLY_ENV, default ~/reactdiff-nightly.env):
#   MLFLOW_TRACKING_URI    required, e.g. http://mlflow.internal:5000
#   REACTDIFF_DATA         default s3://reactdiff-data/react/raw
#   REACTDIFF_SNAPSHOTS    default s3://reactdiff-data/react/snapshots
#   REACTDIFF_MODELS       default s3://reactdiff-data/react/models (the paper extractors)
#   REACTDIFF_FEATURE_SET  default paper (must match the earlier snapshots to carry clips over)
#
# Install (cron runs on the host; the script runs in the Ray container):
#   ray exec ray_cluster.yaml --run-env=host '(crontab -l 2>/dev/null; echo "30 2 * * * docker exec ray_container bash /home/ray/reactdiff-pipeline/infra/launcher/extract_nightly.sh >> /tmp/reactdiff-extract-nightly.log 2>&1") | crontab -'
set -euo pipefail

ENV_FILE="${REACTDIFF_NIGHTLY_ENV:-$HOME/reactdiff-nightly.env}"
if [[ -f "$ENV_FILE" ]]; then
    # shellcheck disable=SC1090
    source "$ENV_FILE"
fi
: "${MLFLOW_TRACKING_URI:?set MLFLOW_TRACKING_URI (environment or $ENV_FILE)}"
DATA="${REACTDIFF_DATA:-s3://reactdiff-data/react/raw}"
SNAPSHOTS="${REACTDIFF_SNAPSHOTS:-s3://reactdiff-data/react/snapshots}"
MODELS="${REACTDIFF_MODELS:-s3://reactdiff-data/react/models}"
FEATURE_SET="${REACTDIFF_FEATURE_SET:-paper}"

export RAY_AUTH_MODE=token RAY_USAGE_STATS_ENABLED=0
ADDRESS="http://127.0.0.1:8265"
ID="extract-$(date -u +%Y%m%d)"

exec 9> /tmp/reactdiff-extract-nightly.lock
if ! flock -n 9; then
    echo "$(date -u +%FT%TZ) previous extraction still running; skipping $ID"
    exit 0
fi

MODEL_ARGS=()
if [[ "$FEATURE_SET" == paper ]]; then
    MODEL_ARGS=(--model "au=$MODELS/au.pt" --model "va=$MODELS/va.pt" --model "fe=$MODELS/fe.pt"
                --model "wav2vec2=$MODELS/wav2vec2-base/pytorch_model.bin")
fi

echo "$(date -u +%FT%TZ) submitting $ID"
ray job submit --address "$ADDRESS" --submission-id "$ID" \
    --runtime-env-json "{\"env_vars\": {\"MLFLOW_TRACKING_URI\": \"$MLFLOW_TRACKING_URI\"}}" \
    -- python -m jobs.extract --config jobs/configs/extract.yaml \
       --data "$DATA" --out "$SNAPSHOTS" --feature-set "$FEATURE_SET" "${MODEL_ARGS[@]}" \
       --set incremental_from=latest
