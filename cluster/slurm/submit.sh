#!/usr/bin/env bash
# The whole method as SLURM job arrays with dependencies (docs/cluster.md):
#
#   cluster/slurm/submit.sh RUN_DIR --shards N [--wait] [--until STEP] [--time T] [--mem M] [--cpus-per-task C]
#                           [--gres G] [--sbatch-args "..."]... -- <igd pipeline options>
#
#   rank (array over the layer's neurons) ─> merge-importance ─> calibrate ──────────┐
#   attack (array over the images: the transfer sets on the base model) ─────────────┴> evaluate (array over the
#   images: the defended evaluation) ─> merge-eval ─> result (THE FINAL STEP: RUN_DIR/result.json)
#
# With --defense FILE.py:NAME among the pipeline options (a user's defence) there is no rank, merge-importance or
# calibrate job: attack ─> evaluate ─> merge-eval ─> result.
#
# Every job runs `igd pipeline <the same options> --out RUN_DIR --piece PIECE` (rank:A:B, rank, calibrate,
# transfer:I/N, defend:I/N, merge), and the final job the plain `igd pipeline <options> --out RUN_DIR --json`, which
# reuses every merged piece: RUN_DIR/result.json is the object igd pipeline prints, every figure equal. A piece
# writes its artifact atomically and a finished piece is skipped, so re-running the driver on the same RUN_DIR
# resumes. --until rank|calibrate|attack|evaluate stops after that step. --wait blocks until this submission's jobs
# (and any still running from an earlier one: RUN_DIR/cluster/jobs.tsv keeps them all) have ended; it exits 1
# naming every job of this submission that did not complete. Every job records its exit status in
# RUN_DIR/.jobs/<job id>[_<task>].status, which --wait reads first.
# Resource options apply to every job (each script's #SBATCH lines are the defaults, lowered to what the partition's
# largest node offers: fit.py); --sbatch-args (partition, account, QOS, ...; shell quoting is kept, repeatable) is
# added to every sbatch. IGD_ACTIVATE (a shell line, e.g. "source ~/igd-env/bin/activate") runs at the top of every
# job before igd is called; when it fails, the job fails saying so in its log.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

die() { echo "error: $*" >&2; exit 2; }
usage() { die "usage: submit.sh RUN_DIR --shards N [--wait] [--until STEP] [--time T] [--mem M] [--cpus-per-task C] [--gres G] [--sbatch-args \"...\"]... -- <igd pipeline options>"; }

[ $# -ge 1 ] || usage
run=$1; shift
case "$run" in -*) usage ;; esac
shards="" wait=0 until=evaluate extra_args=() res=() fit_args=()
while [ $# -gt 0 ]; do
  case "$1" in
    --shards) shards=${2:?--shards N}; shift 2 ;;
    --wait) wait=1; shift ;;
    --until) until=${2:?--until STEP}; shift 2 ;;
    --time|--mem|--cpus-per-task|--gres) res+=("$1=${2:?$1 VALUE}"); fit_args+=("$1" "$2"); shift 2 ;;
    --sbatch-args)  # split as the shell would: a quoted value stays one argument
      quoted=$(python3 -c 'import shlex, sys; print(" ".join(map(shlex.quote, shlex.split(sys.argv[1]))))' \
        "${2?--sbatch-args \"...\"}" 2>/dev/null) || die "--sbatch-args $2: unbalanced quotes"
      eval "extra_args+=($quoted)"; shift 2 ;;
    --) shift; break ;;
    *) die "submit.sh: unknown option $1 (igd pipeline options go after --)" ;;
  esac
done
[[ "$shards" =~ ^[1-9][0-9]*$ ]] || die "--shards N: a positive integer is required"
case "$until" in rank|calibrate|attack|evaluate) ;; *) die "--until $until: expected rank, calibrate, attack or evaluate" ;; esac
command -v sbatch >/dev/null || die "sbatch not found: run submit.sh on a SLURM login node (or cluster/slurm/local-cluster.sh up DIR)"
if [ -n "${IGD_ACTIVATE:-}" ]; then  # activation scripts may read unset variables
  set +u; eval "$IGD_ACTIVATE" || die "IGD_ACTIVATE failed (exit $?): $IGD_ACTIVATE"; set -u
fi

# 0. the scripts' resource defaults that the partition cannot give, lowered to its largest node (fails here for an
# explicit --cpus-per-task/--mem/--time that no node offers)
partition=${SBATCH_PARTITION:-}
for ((i = 0; i < ${#extra_args[@]}; i++)); do
  case "${extra_args[i]}" in
    --partition=*) partition=${extra_args[i]#--partition=} ;;
    -p?*) partition=${extra_args[i]#-p} ;;
    --partition|-p) partition=${extra_args[i + 1]:-} ;;
  esac
done
declare -A fitted=()
fit_out=$(python3 "$here/fit.py" "$here" ${partition:+--partition "$partition"} "${fit_args[@]}") || exit $?
while IFS=$'\t' read -r script opts; do [ -n "$script" ] && fitted[$script]=$opts; done <<<"$fit_out"
mkdir -p "$run/logs" "$run/cluster"
run=$(cd "$run" && pwd)
# 1. the plan: igd pipeline's options -> per-step igd options, layer and neuron count (fails here, not in a job)
plan=$(python3 "$here/plan.py" "$run" "$shards" -- "$@") || exit $?
field() { python3 -c 'import json,sys; v=json.loads(sys.argv[1])[sys.argv[2]]; print(" ".join(v) if isinstance(v, list) else v)' "$plan" "$1"; }
rank_shards=$(field rank_shards) n_neurons=$(field n_neurons) own_defense=$(field defense)
if [ "$own_defense" = yes ]; then
  case "$until" in rank|calibrate) die "--until $until: a --defense run has no ranking or calibration (--until attack or evaluate)" ;; esac
fi
tag=$(basename "$run")

# 2. submit: every job gets the run's environment, its name, a log per task in RUN_DIR/logs, and (for a job with
# a dependency) --kill-on-invalid-dep so that a failed predecessor cancels it instead of leaving it pending
export IGD_RUN=$run IGD_SHARDS=$shards IGD_RANK_SHARDS=$rank_shards IGD_N_NEURONS=$n_neurons IGD_SLURM_DIR=$here
# jobs.tsv keeps every submission's jobs (NAME, JOB ID, ARRAY, SUBMISSION): --wait also waits for the jobs of an
# earlier submission that still run
jobs_file=$run/cluster/jobs.tsv
submission=1
[ -f "$jobs_file" ] && submission=$(( $(awk -F'\t' 'NF >= 4 { n = $4 } END { print n + 0 }' "$jobs_file") + 1 ))
submit() {  # submit NAME DEPENDENCY ARRAY SCRIPT [SCRIPT ARGS...] -> prints the job id
  local name=$1 dep=$2 array=$3 script=$4; shift 4
  local fit=()
  read -r -a fit <<<"${fitted[$script]:-}"
  local args=(--parsable --job-name="igd-$name-$tag" --open-mode=append --export=ALL "${fit[@]}" "${res[@]}" "${extra_args[@]}")
  if [ -n "$array" ]; then args+=(--array="$array" --output="$run/logs/$name.%A_%a.log")
  else args+=(--output="$run/logs/$name.%j.log"); fi
  [ -n "$dep" ] && args+=(--dependency="afterok:$dep" --kill-on-invalid-dep=yes)
  local id
  id=$(sbatch "${args[@]}" "$here/$script" "$@") || die "sbatch failed for $name"
  id=${id%%;*}
  printf '%s\t%s\t%s\t%s\n' "igd-$name-$tag" "$id" "$array" "$submission" >>"$jobs_file"
  echo "$id"
}
last= rank= calibrate=
if [ "$own_defense" != yes ]; then  # a --defense run (igd pipeline --defense) has nothing to rank or calibrate
  if [ "$rank_shards" -gt 0 ]; then rank=$(submit rank "" "0-$((rank_shards - 1))" rank.sbatch); fi
  merge_imp=$(submit merge-importance "$rank" "" merge.sbatch importance); last=$merge_imp
  if [ "$until" != rank ]; then
    calibrate=$(submit calibrate "$merge_imp" "" calibrate.sbatch); last=$calibrate
  fi
fi
before_eval=$last
if [ "$until" = attack ] || [ "$until" = evaluate ]; then  # the transfer sets need no ranking: from the start
  attack=$(submit attack "" "0-$((shards - 1))" attack.sbatch)
  last="${calibrate:+$calibrate:}$attack"; before_eval=$last
fi
if [ "$until" = evaluate ]; then
  evaluate=$(submit evaluate "$before_eval" "0-$((shards - 1))" evaluate.sbatch)
  merge_eval=$(submit merge-eval "$evaluate" "" merge.sbatch eval)
  # 3. THE FINAL STEP: RUN_DIR/result.json, the object `igd pipeline <options> --json` prints
  rm -f "$run/result.json"
  last=$(submit result "$merge_eval" "" result.sbatch)
fi
n=$(awk -F'\t' -v s="$submission" '$4 == s' "$jobs_file" | wc -l)
echo "submitted $n jobs for $run (submission $submission; ids in $jobs_file, logs in $run/logs)"
[ "$wait" = 1 ] || exit 0

# 4. --wait: until this submission's jobs, and the earlier ones still running, have ended; then every job's (and
# array task's) final state
exec python3 "$here/wait.py" "$jobs_file"
