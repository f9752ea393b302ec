#!/usr/bin/env bash
# Submit the quickstart job to a running Ray cluster, with one-GPU kernel actors.
#   RAY_ADDRESS=http://HEAD:8265 HEAD_PYTHON=/home/ubuntu/freeshap_ray/.venv/bin/python \
#     OUTPUT=s3://YOUR-BUCKET/freeshap/quickstart bash cluster/submit_example.sh
# HEAD_PYTHON is the head's Python (the job's entrypoint runs with the head's PATH, which need not hold it):
# /home/ubuntu/freeshap_ray/.venv/bin/python on autoscaler-aws.yaml, python in the cluster/Dockerfile image,
# "$PWD/.venv/bin/python" for a head started from this checkout's .venv (see cluster/README.md).
# The driver runs on the head node and writes every output (OUTPUT: an object-store URI or a path the
# head node can write); kernel actors and Shapley tasks are scheduled across the cluster.
# Rerunning the same command after a failure resumes from what OUTPUT already holds.
set -euo pipefail
cd "$(dirname "$0")/.."
: "${RAY_ADDRESS:?set RAY_ADDRESS=http://HEAD:8265 (dashboard of the head node)}"
: "${HEAD_PYTHON:?set HEAD_PYTHON to the Python of the head node that has freeshap_ray (see cluster/README.md)}"
OUTPUT=${OUTPUT:-/shared/freeshap/quickstart}
export RAY_AUTH_MODE=${RAY_AUTH_MODE:-token}   # the cluster's token: ~/.ray/auth_token or RAY_AUTH_TOKEN
ray job submit --working-dir . --runtime-env cluster/runtime_env.yaml -- \
  "$HEAD_PYTHON" -m freeshap_ray run configs/quickstart.yaml --no-progress \
  --set "output=$OUTPUT" \
  --set kernel.num_actors=4 --set kernel.num_gpus_per_actor=1 --set kernel.num_cpus_per_actor=4 \
  --set kernel.placement=PACK
