#!/usr/bin/env bash
# N jaxlm processes on this machine, each with its own fake CPU devices, joined through
# jax.distributed (Gloo collectives over TCP): a multi-host run in miniature, for tests.
#
# usage: launch/multiprocess_cpu.sh [-n PROCESSES] [-d DEVICES_PER_PROCESS] [-p PORT] COMMAND CONFIG [key=value ...]
#   launch/multiprocess_cpu.sh -n 2 -d 4 pretrain configs/pretrain/tiny.yaml train.run_dir=runs/mp
#
# Defaults: 2 processes, 4 devices each, a free port. Every process prints to this terminal;
# only process 0 writes metrics, progress and the summary. The exit status is the first
# non-zero one among the processes (0 if all succeed). SIGTERM/SIGINT are passed on to all.
# PYTHON picks the interpreter (default: python).
set -euo pipefail

usage() { sed -n '2,11p' "$0" | sed 's/^# \{0,1\}//'; }
n=2 d=4 port=""
while getopts "n:d:p:h" opt; do
  case $opt in
    n) n=$OPTARG ;;
    d) d=$OPTARG ;;
    p) port=$OPTARG ;;
    h) usage; exit 0 ;;
    *) usage >&2; exit 2 ;;
  esac
done
shift $((OPTIND - 1))
if [ $# -lt 1 ]; then usage >&2; exit 2; fi
python=${PYTHON:-python}
if [ -z "$port" ]; then
  port=$("$python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
fi
# Drop any device count already in XLA_FLAGS (e.g. from a test harness): each process gets d.
flags=$(printf '%s' "${XLA_FLAGS:-}" | sed 's/--xla_force_host_platform_device_count=[0-9]*//g')

pids=()
for ((i = 0; i < n; i++)); do
  JAXLM_COORDINATOR="127.0.0.1:$port" JAXLM_NUM_PROCESSES="$n" JAXLM_PROCESS_ID="$i" \
    JAX_PLATFORMS=cpu XLA_FLAGS="$flags --xla_force_host_platform_device_count=$d" \
    "$python" -m jaxlm "$@" &
  pids+=($!)
done
trap 'kill -TERM "${pids[@]}" 2>/dev/null || true' TERM INT

status=0
for pid in "${pids[@]}"; do
  while :; do  # a trapped signal interrupts `wait`; wait again until the process is gone
    rc=0
    wait "$pid" || rc=$?
    if ! kill -0 "$pid" 2>/dev/null; then break; fi
  done
  if [ "$status" -eq 0 ]; then status=$rc; fi
done
exit "$status"
