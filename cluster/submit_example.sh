#!/usr/bin/env bash
# Submit the quickstart job to a running Ray cluster (dashboard address in RAY_ADDRESS).
# The driver runs on the head node; kernel actors and Shapley tasks are scheduled across the cluster.
# `output` must be a path all nodes and the driver share (results are written by the driver).
set -euo pipefail
: "${RAY_ADDRESS:?set RAY_ADDRESS=http://HEAD:8265}"
ray job submit --working-dir . --runtime-env cluster/runtime_env.yaml -- \
  freeshap-ray run configs/quickstart.yaml --overwrite \
  --set output=/shared/freeshap/quickstart \
  --set kernel.num_actors=4 --set kernel.num_gpus_per_actor=1
