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

# done_already FILE: a finished shard is never recomputed. Every igd artifact is written atomically (temporary
# file + rename), so an existing file is complete; plan.py binds the run folder to one set of options, so it is
# this run's. Prints the skip record on stdout (the JSON lines of the log) and succeeds when FILE exists.
done_already() {
  if [ -s "$1" ]; then
    printf '{"out": "%s", "skipped": true}\n' "$1"
    say "skipped: $1 exists (finished earlier)"
    return 0
  fi
  return 1
}

# shard_tag I: the file tag of shard I of IGD_SHARDS
shard_tag() { echo "$1-of-$IGD_SHARDS"; }
