#!/usr/bin/env bash
# Run the same jaxlm command on every worker of a Cloud TPU VM pod slice (e.g. v5e-256: 64 hosts).
#
# usage: launch/tpu_pod.sh TPU_NAME ZONE COMMAND CONFIG [key=value ...]
#   launch/tpu_pod.sh my-v5e-256 us-west4-a pretrain my_7b.yaml train.run_dir=/mnt/shared/7b
# Layout: one slice is one ICI domain, FSDP over all of it (mesh.data=1 mesh.fsdp=256); across
#   slices (multislice) put mesh.data or mesh.stage on the slow network (mesh.stage=2 mesh.fsdp=256).
#
# Each worker runs `python -m jaxlm ...` in JAXLM_REMOTE_DIR (default: ~/jaxlm, a checkout with
# jaxlm installed, the config file copied to every worker) with JAXLM_DISTRIBUTED=auto: JAX reads
# the pod's topology (process count, ids, coordinator) from the TPU metadata. train.run_dir must
# be shared by all workers (a Filestore/NFS mount, or a gcsfuse-mounted bucket). Extra gcloud
# flags (e.g. --project=P) go in GCLOUD_FLAGS. Runs in the foreground: use tmux on your machine,
# or the run stops when the ssh sessions end. REMOTE_PYTHON: the interpreter there (python3).
set -euo pipefail

if [ $# -lt 3 ]; then sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; fi
tpu=$1 zone=$2
shift 2
remote_dir=${JAXLM_REMOTE_DIR:-'~/jaxlm'}
command=$(printf '%q ' "$@")
# shellcheck disable=SC2086  # GCLOUD_FLAGS is a list of flags
gcloud compute tpus tpu-vm ssh "$tpu" --zone="$zone" --worker=all ${GCLOUD_FLAGS:-} \
  --command="cd $remote_dir && JAXLM_DISTRIBUTED=auto ${REMOTE_PYTHON:-python3} -m jaxlm $command"
