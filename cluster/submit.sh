#!/usr/bin/env bash
# Submit `unlearn run CONFIG [key=value ...]` to a Ray cluster with token authentication.
#
#   RAY_ADDRESS=http://HEAD:8265 RAY_AUTH_TOKEN=... MLFLOW_TRACKING_URI=http://mlflow:5000 \
#       cluster/submit.sh configs/tofu_smollm2_pdu.yaml ray.num_workers=4 ray.use_gpu=true
#
# RAY_AUTH_TOKEN (or RAY_AUTH_TOKEN_PATH, or `ray get-auth-token` on the head) must match the
# cluster's token; RAY_AUTH_MODE=token is set here so the CLI sends it.
set -euo pipefail
if [[ $# -lt 1 ]]; then
  echo "usage: $0 CONFIG.yaml [key=value ...]" >&2
  exit 2
fi
: "${RAY_ADDRESS:?set RAY_ADDRESS to the dashboard address of the head, e.g. http://HEAD:8265}"
: "${MLFLOW_TRACKING_URI:?set MLFLOW_TRACKING_URI to an MLflow server the cluster can reach}"
export RAY_AUTH_MODE=token
cd "$(dirname "$0")/.."
# One runtime env: cluster/runtime_env.yaml plus the MLflow URI the driver and workers use.
runtime_env_json=$(python -c 'import json, os, yaml
env = yaml.safe_load(open("cluster/runtime_env.yaml"))
env.setdefault("env_vars", {})["MLFLOW_TRACKING_URI"] = os.environ["MLFLOW_TRACKING_URI"]
print(json.dumps(env))')
exec ray job submit --address "$RAY_ADDRESS" --working-dir . --runtime-env-json "$runtime_env_json" \
  -- unlearn run "$@"
