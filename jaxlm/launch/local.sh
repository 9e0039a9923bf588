#!/usr/bin/env bash
# One host: a single jaxlm process drives every local accelerator (or the CPU).
#
# usage: launch/local.sh COMMAND CONFIG [key=value ...]
#   launch/local.sh pretrain configs/pretrain/tiny.yaml train.steps=100
#
# JAXLM_DISTRIBUTED=off makes it one process even inside a SLURM step or with JAXLM_* set.
# PYTHON picks the interpreter (default: python).
set -euo pipefail

if [ $# -lt 1 ] || [ "$1" = "-h" ]; then sed -n '2,8p' "$0" | sed 's/^# \{0,1\}//'; exit $(( $# < 1 ? 2 : 0 )); fi
JAXLM_DISTRIBUTED=off exec "${PYTHON:-python}" -m jaxlm "$@"
