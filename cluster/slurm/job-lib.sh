# Sourced first by every job script of the cluster route, after `set -euo pipefail`: records how the job ends in
# the run folder, runs IGD_ACTIVATE (a failed activation fails the job, saying so in its log), and defines the
# shared helpers. Set by submit.sh through the job environment: IGD_RUN (run folder), IGD_SHARDS, IGD_SLURM_DIR.

: "${IGD_RUN:?IGD_RUN is set by cluster/slurm/submit.sh}"
export IGD_NO_PROGRESS=${IGD_NO_PROGRESS:-1}  # logs, not progress bars

# say MESSAGE: one line on stderr (the task's log) with the time and the task
say() { echo "[$(date -u +%FT%TZ) ${SLURM_JOB_NAME:-job} ${SLURM_ARRAY_JOB_ID:-${SLURM_JOB_ID:-}}_${SLURM_ARRAY_TASK_ID:-}] $*" >&2; }

# The job's own record of how it ended: RUN/.jobs/<job id>[_<array task>].status, one JSON line written at exit
# however the script ends (a signal from scancel, a requeue or the time limit counts as 128 + its number), so
# that wait.py knows it even where the controller has forgotten the job (no accounting, MinJobAge passed).
if [ -n "${SLURM_ARRAY_JOB_ID:-}" ]; then job_key=${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID:-}
else job_key=${SLURM_JOB_ID:-}; fi
record_status() {
  local rc=$? dir=$IGD_RUN/.jobs
  [ -n "$job_key" ] || return 0
  mkdir -p "$dir" &&
    printf '{"exit": %d, "host": "%s", "restart": %d, "end": "%s"}\n' "$rc" "$(hostname)" \
      "${SLURM_RESTART_COUNT:-0}" "$(date -u +%FT%TZ)" >"$dir/.$job_key.status.$$" &&
    mv -f "$dir/.$job_key.status.$$" "$dir/$job_key.status" || true
}
for sig in HUP INT TERM USR1 USR2 XCPU; do trap "exit \$((128 + $(kill -l "$sig")))" "$sig"; done
trap record_status EXIT

# IGD_ACTIVATE: one shell line that makes igd available (a venv, modules, conda). Activation scripts may read
# unset variables, so it runs without -u; its status is that of its last command.
if [ -n "${IGD_ACTIVATE:-}" ]; then
  set +u
  eval "$IGD_ACTIVATE" || { rc=$?; say "error: IGD_ACTIVATE failed (exit $rc): $IGD_ACTIVATE"; exit "$rc"; }
  set -u
fi
command -v igd >/dev/null ||
  { say "error: igd not found${IGD_ACTIVATE:+ after IGD_ACTIVATE ($IGD_ACTIVATE)}: set IGD_ACTIVATE to the line" \
      "that activates igd's environment"; exit 127; }

# step_args STEP: the igd options of STEP (RUN/cluster/STEP.args, written by plan.py) into the array ARGS
step_args() {
  local f="$IGD_RUN/cluster/$1.args"
  [ -f "$f" ] || { echo "error: $f missing: submit through cluster/slurm/submit.sh" >&2; exit 2; }
  mapfile -t ARGS <"$f"
}

# piece PIECE: igd pipeline with the run's options on the run folder, computing PIECE only (its --json line goes to
# the task's log: a finished piece says "skipped": true)
piece() {
  step_args pipeline
  say "igd pipeline --piece $1"
  igd pipeline "${ARGS[@]}" --out "$IGD_RUN" --piece "$1" --json
}
