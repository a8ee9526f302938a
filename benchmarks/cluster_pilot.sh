#!/usr/bin/env bash
# A pilot run through the SLURM route on a one-node local cluster, then cluster/slurm/size.py for a full run
# (docs/cluster.md, "Sizing a run"). Writes the pilot's result, every task's logged seconds and the sizing to OUT.
#
#   benchmarks/cluster_pilot.sh OUT.json SHARDS IMAGES_FULL -- <igd pipeline options of the pilot>
#
# e.g. the real CIFAR-10 ResNet-18 at the quick preset, ε = 1/255, 8 images in 2 shards, sized for 10 000 images:
#   benchmarks/cluster_pilot.sh benchmarks/results/cluster-pilot-resnet18-quick-cpu.json 2 10000 -- \
#     --model "$(python -c 'import pyautoattack,os;print(os.path.dirname(pyautoattack.__file__))')/examples/model_test.pt" \
#     --arch resnet18 --dataset DATA/cifar10-test-846.safetensors --probe-dataset DATA/cifar10-train-4660.safetensors \
#     --n-probe 256 --n-examples 8 --eps 1/255 --preset quick
set -euo pipefail
[ $# -ge 4 ] && [ "$4" = "--" ] || { echo "usage: $0 OUT.json SHARDS IMAGES_FULL -- <igd pipeline options>" >&2; exit 2; }
out=$(realpath -m "$1") shards=$2 full=$3; shift 4
here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
work=$(mktemp -d /tmp/igd-pilot.XXXXXX)
trap '"$here/cluster/slurm/local-cluster.sh" down "$work/slurm" >/dev/null 2>&1 || true' EXIT
eval "$("$here/cluster/slurm/local-cluster.sh" up "$work/slurm")"
export IGD_NO_PROGRESS=1 IGD_HOME=$work/home PYTHONPATH=$here
export IGD_ACTIVATE="igd() { $(command -v python) -m igd_cli \"\$@\"; }"
load0=$(cut -d' ' -f1-3 /proc/loadavg)
s=$(date +%s.%N)
"$here/cluster/slurm/submit.sh" "$work/run" --shards "$shards" --wait --cpus-per-task 1 --mem 4G --time 1-00:00:00 -- "$@"
e=$(date +%s.%N)
load1=$(cut -d' ' -f1-3 /proc/loadavg)
python3 "$here/cluster/slurm/size.py" "$work/run" --images "$full" --time 04:00:00 --json >"$work/size-4h.json"
python3 "$here/cluster/slurm/size.py" "$work/run" --images "$full" --time 1-00:00:00 --json >"$work/size-24h.json"
python3 "$here/cluster/slurm/size.py" "$work/run" --images "$full" --time 04:00:00  # the table, for the log
python3 - "$here" "$out" "$work" "$s" "$e" "$load0" "$load1" "$shards" "$full" "$@" <<'PY'
import json, os, platform, sys
from pathlib import Path
here, out, work, s, e, load0, load1, shards, full, *opts = sys.argv[1:]
sys.path.insert(0, os.path.join(here, "benchmarks"))
from _data import write_results  # paths of this machine made portable, the data files named by their recipe
work = Path(work)
tasks = []
for log in sorted((work / "run" / "logs").glob("*.log")):
    for line in log.read_text().splitlines():
        if line.startswith("{") and '"piece"' in line:
            tasks.append({"log": log.name, **{k: v for k, v in json.loads(line).items() if k != "out"}})
result = json.loads((work / "run" / "result.json").read_text())
keep = ("n_examples", "clean_accuracy", "base_clean_accuracy", "worst_case", "worst_case_std", "base_worst_case",
        "k", "n_neurons", "layer", "eps", "preset", "budgets", "draws", "seconds")
write_results(out, {
    "what": "a pilot through the SLURM route (one-node local cluster, 1 CPU per task), sized for a full run by "
            "cluster/slurm/size.py",
    "command": f"benchmarks/cluster_pilot.sh {out} {shards} {full} -- " + " ".join(opts),
    "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "load_start": load0, "load_end": load1},
    "route_seconds": round(float(e) - float(s), 1), "shards": int(shards),
    "result": {k: result.get(k) for k in keep}, "tasks": tasks,
    "size_for": int(full), "size_4h": json.loads((work / "size-4h.json").read_text()),
    "size_24h": json.loads((work / "size-24h.json").read_text())})
print(f"wrote {out}")
PY
