# Sourced by every job script of the cluster route (after IGD_ACTIVATE): shared helpers.
# Set by submit.sh through the job environment: IGD_RUN (run folder), IGD_SHARDS, IGD_SLURM_DIR.

: "${IGD_RUN:?IGD_RUN is set by cluster/slurm/submit.sh}"
export IGD_NO_PROGRESS=${IGD_NO_PROGRESS:-1}  # logs, not progress bars

# step_args STEP: the igd options of STEP (RUN/cluster/STEP.args, written by plan.py) into the array ARGS
step_args() {
  local f="$IGD_RUN/cluster/$1.args"
  [ -f "$f" ] || { echo "error: $f missing: submit through cluster/slurm/submit.sh" >&2; exit 2; }
  mapfile -t ARGS <"$f"
}

# say MESSAGE: one line on stderr (the task's log) with the time and the task
say() { echo "[$(date -u +%FT%TZ) ${SLURM_JOB_NAME:-job} ${SLURM_ARRAY_JOB_ID:-${SLURM_JOB_ID:-}}_${SLURM_ARRAY_TASK_ID:-}] $*" >&2; }

# piece PIECE: igd pipeline with the run's options on the run folder, computing PIECE only (its --json line goes to
# the task's log: a finished piece says "skipped": true)
piece() {
  step_args pipeline
  say "igd pipeline --piece $1"
  igd pipeline "${ARGS[@]}" --out "$IGD_RUN" --piece "$1" --json
}
