"""Reproduce what this machine can of the IG-Defense paper's experiments with igd's own commands; one Markdown page.

    python benchmarks/reproduce.py --quick                 # smoke run, minutes on a 2-core CPU
    python benchmarks/reproduce.py                         # default budgets
    python benchmarks/reproduce.py --paper --device cuda   # the paper's attack budgets and more images (a GPU)

A driver, no experiment code: per model it runs ``igd rank`` (LO-IR and the random baseline), ``igd calibrate-k``
and ``igd analyze shift | sweep --over k | sweep --over sigma | ablation`` into a run folder
``OUT/reproduce-TAG/<model>/`` and renders it with ``igd report``; the ranking cost and the defended forward cost
come from ``bench_lo_ir.py`` and ``bench_defense.py``. ``reproduce-TAG.md`` links the run reports and decides the
paper's claims from the measured numbers. Models: the embedded ``demo`` CNN (PGD-trained on digits) and the real
CIFAR-10 ResNet-18 of pyautoattack (standard training) with ``cifar10-train-4660`` / ``cifar10-test-846`` from
``--data-dir`` (default ``$IGD_DATA_DIR``, else ``$IGD_HOME/data``) at a small ε (its robustness is zero at the
paper's 8/255). The raw results go to ``reproduce-TAG.json`` first; ``--from-json`` re-renders the page from it
(every figure and verdict on the page is computed from that file).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))

from _data import add_data_dir, data_file, portable, write_results  # noqa: E402
from igd_cli.artifacts import atomic_write_bytes  # noqa: E402
from igd_cli.common import parse_eps  # noqa: E402

#: per mode: images for the analyses, attack budget flags, probe images, timing rounds
MODES: dict[str, dict[str, Any]] = {
    "quick": {"n": 24, "n_shift": 64, "budget": ["--steps", "5", "--queries", "100", "--eot-iter", "2",
                                                 "--restarts", "1"], "probe": 256, "rounds": 2, "lo_probe": 32},
    "default": {"n": 100, "n_shift": 450, "budget": ["--preset", "quick"], "probe": None, "rounds": 5,
                "lo_probe": 256},
    "paper": {"n": 1000, "n_shift": 1000, "budget": ["--preset", "paper"], "probe": None, "rounds": 7,
              "lo_probe": 4660},
}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def run(*args: str, json_out: bool = True) -> Any:
    """``python ARGS`` in the repository root (``-m igd_cli ...`` or a benchmark); its JSON when asked."""
    env = {**os.environ, "IGD_NO_PROGRESS": "1", "HF_HUB_OFFLINE": "1"}
    p = subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, cwd=ROOT)
    if p.returncode != 0:
        raise SystemExit(f"error: {' '.join(args[:3])} failed: {(p.stderr.strip().splitlines() or ['?'])[-1]}")
    return json.loads(p.stdout.strip().splitlines()[-1]) if json_out else p.stdout


def igd(*args: str) -> dict[str, Any]:
    return run("-m", "igd_cli", *args, "--json")


def model_runs(name: str, model: list[str], train: list[str], test: list[str], eps: str, cfg: dict, out: Path,
               device: str) -> dict[str, Any]:
    """Every igd analysis for one model into ``out``; the JSON results by name."""
    out.mkdir(parents=True, exist_ok=True)
    common = [*model, "--device", device]
    probe = ["--n-probe", str(cfg["probe"])] if cfg["probe"] else []
    r: dict[str, Any] = {}
    for method in ("lo-ir", "random"):
        log(f"{name}: rank {method}")
        r[f"rank-{method}"] = igd("rank", *common, *train, "--method", method, *probe,
                                  "--out", str(out / f"importance-{method}.safetensors"))
    imp, rnd = r["rank-lo-ir"]["out"], r["rank-random"]["out"]
    n_neurons = r["rank-lo-ir"]["shape"][0]
    paper_k = max(1, round(50 / 512 * n_neurons))  # the paper's k = 50 of 512
    for method, path in (("lo-ir", imp), ("random", rnd)):
        log(f"{name}: calibrate-k {method}")
        r[f"calibrate-{method}"] = igd("calibrate-k", *common, *test, "--importance", path, "--eps", eps,
                                       "--n-examples", str(cfg["n_shift"]), "--plot",
                                       str(out / f"calibration-{method}.png"),
                                       "--out", str(out / f"mask-{method}.safetensors"))
    k = r["calibrate-lo-ir"]["k"]
    a = [*common, *test, "--eps", eps, "--out", str(out)]
    log(f"{name}: analyze shift (k = {paper_k})")
    r["shift"] = igd("analyze", "shift", *a, "--importance", imp, "--k", str(paper_k), "--n-examples",
                     str(cfg["n_shift"]))
    ks = sorted({1, 2, 4, 8, 16, 32, 64, n_neurons // 2, n_neurons, k, paper_k} - {0})
    for method, path in (("lo-ir", imp), ("random", rnd)):
        log(f"{name}: analyze sweep --over k ({method})")
        r[f"sweep-k-{method}"] = igd("analyze", "sweep", *a, "--importance", path, "--over", "k", "--values",
                                     ",".join(map(str, ks)), "--attack", "none", "--n-examples", str(cfg["n_shift"]))
    e = parse_eps(eps)
    sigmas = ",".join(f"{v:.6g}" for v in (0, e / 4, e / 2, e, 2 * e))
    log(f"{name}: analyze sweep --over sigma (k = {paper_k}, AA)")
    r["sweep-sigma"] = igd("analyze", "sweep", *a, "--importance", imp, "--over", "sigma", "--values", sigmas,
                           "--k", str(paper_k), "--attack", "aa", "--n-examples", str(cfg["n"]), *cfg["budget"])
    log(f"{name}: analyze ablation (k = {paper_k}, IW-WC)")
    r["ablation"] = igd("analyze", "ablation", *a, "--importance", imp, "--k", str(paper_k), "--n-examples",
                        str(cfg["n"]), *cfg["budget"])
    r["report"] = igd("report", str(out))
    r["k"], r["paper_k"], r["n_neurons"] = k, paper_k, n_neurons
    return r


def pct(v: float | None) -> str:
    return "—" if v is None else f"{100 * v:.1f}"


def claims(R: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(paper claim, verdict, evidence), decided from the measured numbers."""
    rows = []
    for name, r in R["models"].items():
        pts = {p["value"]: p for p in r["sweep-k-lo-ir"]["points"]}
        rnd = {p["value"]: p for p in r["sweep-k-random"]["points"]}
        pk = r["paper_k"]
        keep = pts[pk]["clean"] >= pts[pk]["base_clean"] - 0.005
        rows.append((f"{name}: k = 50 of 512 (here {pk} of {r['n_neurons']}) keeps clean accuracy",
                     "supported" if keep else "contradicted",
                     f"LO-IR at k = {pk}: {pct(pts[pk]['clean'])}% vs base {pct(pts[pk]['base_clean'])}%; "
                     f"calibrate-k picks k = {r['k']} (random ranking {r['calibrate-random']['k']})"))
        small = [v for v in pts if v <= r["n_neurons"] / 8]
        gap = sum(pts[v]["clean"] - rnd[v]["clean"] for v in small) / len(small)
        rows.append((f"{name}: LO-IR ranks better than random (Table 6 Random-50)",
                     "supported" if gap > 0 else "not supported",
                     f"mean clean accuracy over k ≤ N/8, LO-IR minus random: {100 * gap:+.1f} points"))
        rows_ab = {x["masking"] + (" + RS" if x["rs"] else ""): x["figures"] for x in r["ablation"]["rows"]}
        base = r["ablation"]["rows"][0]["figures"]
        lo = rows_ab.get(f"lo-ir-{pk} + RS", {})
        nine = "iw_wc_paper" if "iw_wc_paper" in lo else "iw_wc"  # results made before iw_wc_paper was recorded
        gain, std = (lo.get(nine) or 0) - (base.get(nine) or 0), lo.get(f"{nine}_std") or 0
        verdict = ("supported" if gain > max(0.005, std) else "contradicted" if gain < -max(0.005, std)
                   else "no change beyond the draw-to-draw spread")
        ten = (f"; with the adaptive attack (ten columns) {pct(lo.get('iw_wc'))} ± {pct(lo.get('iw_wc_std'))}%"
               if nine == "iw_wc_paper" else "")
        rows.append((f"{name}: IG-Defense (LO-IR + RS) raises IW-WC by 1-3 points (Table 6 row 9 vs row 1)", verdict,
                     f"IW-WC over the paper's nine attacks {pct(lo.get(nine))} ± {pct(lo.get(f'{nine}_std'))}% vs base "
                     f"{pct(base.get(nine))}% ({100 * gain:+.1f} points, {r['ablation']['setup']['data']['n']}"
                     f" images){ten}; RS alone {pct(rows_ab.get('none + RS', {}).get(nine))}%"))
        g = r["shift"]["groups"]["successful"]["percent"]
        rows.append((f"{name}: successful attacks lower the GT class's important activations and raise the "
                     "post-attack class's (Fig. 2C)",
                     "supported" if (g.get("gt") or 0) < 0 < (g.get("pred") or 0) else "not supported",
                     f"Δ_y {g.get('gt'):+.1f}%, Δ_ŷ* {g.get('pred'):+.1f}%, Δ_rest {g.get('rest'):+.1f}%, "
                     f"Δ_unimp {(g.get('unimp') or 0):+.1f}% (paper average: −33.3, +32.6, +0.2, −0.2)"))
    ov = {x["configuration"]: x["median_ratio"] for x in R["overhead"]["rows"]}
    on = min(ov["IG-Defense, smoothing, batched passes"], ov["IG-Defense, smoothing, separate passes"])
    rows.append(("Defended inference costs 2× a forward pass", "supported" if on <= 2.2 else "contradicted",
                 f"ResNet-18 layer4: {on:.2f}× with smoothing, "
                 f"{ov['IG-Defense, no smoothing (fx split)']:.2f}× without (bench_defense.py)"))
    return rows


def portable_folder(folder: Path, data_folder: Path | None) -> None:
    """:func:`_data.portable` for the run folders' text files (reports and JSON results; artifacts are left
    alone), so that the committed files name no path of the machine they were made on."""
    for f in sorted(folder.rglob("*")):
        if f.is_file() and f.suffix in (".md", ".json"):
            text = f.read_text()
            new = portable(text, data_folder)
            if new != text:
                atomic_write_bytes(f, new.encode())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=HERE / "results")
    ap.add_argument("--device", default="cpu")
    g = ap.add_mutually_exclusive_group()
    g.add_argument("--quick", action="store_true")
    g.add_argument("--paper", action="store_true")
    add_data_dir(ap)
    ap.add_argument("--resnet-eps", default="1/255", help="ε for the standard-trained ResNet-18 (8/255 breaks it)")
    ap.add_argument("--tag", default=None)
    ap.add_argument("--models", nargs="+", choices=("demo", "resnet18"), default=["demo", "resnet18"])
    ap.add_argument("--from-json", type=Path, default=None, help="only re-render the page from this results file")
    ap.add_argument("--merge", type=Path, nargs="+", default=None,
                    help="join the results files of per-model runs made in parallel (--models demo, --models "
                    "resnet18, same --tag and --out) into OUT/reproduce-TAG.json and its page")
    a = ap.parse_args()
    if a.merge:
        parts = [json.loads(f.read_text()) for f in a.merge]
        R = merge(parts)
        out = a.out / f"reproduce-{R['tag']}.json"
        write_results(out, R, a.data_dir)
        a.from_json = out
    if a.from_json is not None:
        R = json.loads(a.from_json.read_text())
        md = a.from_json.with_suffix(".md")
        portable_folder(a.from_json.parent / f"reproduce-{R['tag']}", a.data_dir)
        atomic_write_bytes(md, render(R).encode())
        log(f"wrote {md}")
        return 0
    mode = "quick" if a.quick else "paper" if a.paper else "default"
    cfg = MODES[mode]
    tag = a.tag or {"quick": f"{a.device}-quick", "default": a.device, "paper": f"{a.device}-paper"}[mode]
    need_resnet = "resnet18" in a.models
    train = data_file("cifar10-train-4660.safetensors", a.data_dir)  # also bench_lo_ir.py's probe set
    test = data_file("cifar10-test-846.safetensors", a.data_dir) if need_resnet else None
    import pyautoattack
    import torch

    resnet = str(Path(pyautoattack.__file__).parent / "examples" / "model_test.pt")
    base = a.out / f"reproduce-{tag}"
    t0 = time.time()
    R: dict[str, Any] = {"mode": mode, "tag": tag, "argv": sys.argv[1:], "cfg": cfg, "device": a.device,
                         "resnet_eps": a.resnet_eps, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                         "cpus": os.cpu_count(), "torch": torch.__version__, "threads": torch.get_num_threads(),
                         "load_start": os.getloadavg(), "models": {}}
    if "demo" in a.models:
        R["models"]["demo"] = model_runs("demo", ["--model", "demo"], [], [], "0.2", cfg, base / "demo", a.device)
    if need_resnet:
        R["models"]["resnet18"] = model_runs(
            "resnet18", ["--model", resnet, "--arch", "resnet18"], ["--dataset", str(train), "--split", "train"],
            ["--dataset", str(test)], a.resnet_eps,
            {**cfg, "n_shift": min(cfg["n_shift"], 846), "n": min(cfg["n"], 846)}, base / "resnet18", a.device)
    log("ranking cost: bench_lo_ir.py; forward cost: bench_defense.py")
    R["ranking_cost"] = run(str(HERE / "bench_lo_ir.py"), "--n-probe", str(cfg["lo_probe"]), "--naive-neurons", "2",
                            "--check-probe", "0", "--layers", "layer4", "--data-dir", str(train.parent),
                            json_out=False)
    R["overhead"] = run(str(HERE / "bench_defense.py"), "--json", "--rounds", str(cfg["rounds"]), "--device",
                        a.device)
    R["minutes"], R["load_end"] = (time.time() - t0) / 60, os.getloadavg()
    portable_folder(base, a.data_dir)
    R = write_results(a.out / f"reproduce-{tag}.json", R, a.data_dir)
    atomic_write_bytes(a.out / f"reproduce-{tag}.md", render(R).encode())
    log(f"wrote {a.out / f'reproduce-{tag}.md'}")
    return 0


def pm(fig: dict[str, Any], key: str) -> str:
    """``mean ± std`` in %, the std only where the figure came from repeated draws."""
    v, sd = fig.get(key), fig.get(f"{key}_std")
    return pct(v) + (f" ± {pct(sd)}" if sd else "")


def model_section(name: str, r: dict[str, Any]) -> list[str]:
    """One model's calibration, ablation (the paper's nine attacks and the ten with the adaptive one) and shift."""
    cal, ab, sh = r["calibrate-lo-ir"], r["ablation"], r["shift"]
    st = ab.get("setup", {})
    L = [f"## {name}", "",
         f"Layer `{cal['layer']}` (N = {r['n_neurons']}); `igd calibrate-k` on {cal['n_examples']} images: k = "
         f"{r['k']} with LO-IR, {r['calibrate-random']['k']} with the random ranking (base clean "
         f"{pct(cal['base_clean_accuracy'])}%, defended {pct(cal['clean_accuracy'])}% at k = {r['k']}). "
         f"The paper's ratio 50/512 gives k = {r['paper_k']}.", "",
         f"Table 6 analogue (`igd analyze ablation`, k = {ab['k']}, σ = {ab['settings']['sigma']:.4g}, "
         f"{st['data']['n']} images, ε = {st['eps']:.4g}, budgets {st['budget']}, {st['draws']} + {st['draws']} "
         "draws): accuracies in %, mean ± std over the final "
         "draws for randomized rows (repeated-draw scoring: per image the attack point is selected on its own "
         "draws and scored on independent ones). IW-WC (nine) is the paper's worst case over clean and its nine "
         "attacks; IW-WC (ten) adds the adaptive attack designed against IG-Defense (two-pass rows only).", "",
         "| row | clean | AA | IW-WC (nine) | IW-WC (ten) |", "|---|---|---|---|---|"]
    for x in ab["rows"]:
        f = x["figures"]
        nine = pm(f, "iw_wc_paper") if "iw_wc_paper" in f else "—"
        L.append(f"| {x['name']} | {pm(f, 'clean')} | {pm(f, 'aa')} | {nine} | {pm(f, 'iw_wc')} |")
    g = sh["groups"]["successful"]
    p = g["percent"]
    L += ["", f"Activation shift (`igd analyze shift`, k = {sh['k']}, {sh['n_images']} images, "
          f"{g['n']} successful attacks): important neurons of the true class {p.get('gt', 0):+.1f}%, of the "
          f"post-attack class {p.get('pred', 0):+.1f}%, of the other classes {p.get('rest', 0):+.1f}%, unimportant "
          f"{(p.get('unimp') or 0):+.1f}%."]
    return L


def merge(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """One results object from per-model runs of the same mode and tag made in parallel: every part's models; the
    ranking and forward costs of the first part (each part measured them); the wall time of the longest part."""
    if len({(p["mode"], p["tag"]) for p in parts}) != 1:
        raise SystemExit("error: --merge: the parts differ in mode or tag")
    R = {**parts[0], "models": {}}
    for p in parts:
        if set(p["models"]) & set(R["models"]):
            raise SystemExit(f"error: --merge: model {sorted(set(p['models']) & set(R['models']))[0]} is in two parts")
        R["models"].update(p["models"])
    R["minutes"] = max(p["minutes"] for p in parts)
    R["load_end"] = max((p["load_end"] for p in parts), key=lambda x: x[0])
    R["parts"] = [{"argv": p["argv"], "date": p["date"], "minutes": p["minutes"], "models": list(p["models"])}
                  for p in parts]
    R["argv"] = [w for w in parts[0]["argv"] if w not in ("--models", *parts[0]["models"])]
    return R


def render(R: dict[str, Any]) -> str:
    """The Markdown page of a results file; every figure and verdict is read or computed from ``R``."""
    tag = R["tag"]
    L = [f"# IG-Defense reproduction on this machine ({tag})", "",
         f"`python benchmarks/reproduce.py {' '.join(R['argv'])}`, {R['date']}, {R['minutes']:.1f} minutes "
         f"(1-minute load {R['load_start'][0]:.1f} at start, {R['load_end'][0]:.1f} at end on {R['cpus']} CPUs). "
         "Every figure below comes from igd's own commands; each model's run folder has the full page "
         "(`igd report`). Raw results: "
         f"[reproduce-{tag}.json](reproduce-{tag}.json).", "",
         "| model | run report |", "|---|---|"]
    if R.get("parts"):
        L[4:4] = ["Run as per-model processes in parallel on the same machine (each also timed the ranking and "
                  "forward costs; the first one's are shown): " + "; ".join(
                      f"`reproduce.py {' '.join(p['argv'])}` {p['minutes']:.1f} minutes" for p in R["parts"]) + ".", ""]
    for name in R["models"]:
        L.append(f"| {name} | [reproduce-{tag}/{name}/report.md](reproduce-{tag}/{name}/report.md) |")
    L += ["", "## The paper's claims", "", "| claim | verdict here | evidence |", "|---|---|---|"]
    L += [f"| {c} | **{v}** | {e} |" for c, v, e in claims(R)]
    for name, r in R["models"].items():
        L += ["", *model_section(name, r)]
    L += ["", "## Ranking cost (bench_lo_ir.py)", "", "```", R["ranking_cost"].strip(), "```", "",
          "Not run here: the paper's adversarially trained models (not obtainable offline), CD-IR with the OpenAI "
          "CLIP (no weights offline), ImageNet.", ""]
    return "\n".join(L)


if __name__ == "__main__":
    sys.exit(main())
