"""The figures README.md and docs/ quote are the figures of the results files they cite.

Each entry of ``FIGURES`` is a sentence or table row as the page prints it, with ``{}`` where a figure stands, the
results file (under ``benchmarks/results/``) the figure comes from, where in that file (a key path, or a function
of the loaded files for a derived figure) and how the page writes it. The test formats the file's figures into the
text and looks for it on the page (whitespace and the minus sign's typography normalised), and checks that the page
cites the file in the same section. A figure changed on the page or in its file, or a file no longer cited beside
it, fails here; so does an entry whose text the page no longer holds.

Key paths: ``a/b/0/c`` (``/`` between keys, an integer indexes a list, ``id=7`` is the list element whose ``id``
is 7, ``re:PATTERN`` the first group of a regular expression in a text value); ``("file.json", "a/b")`` for a
figure of another file. Formats: a format spec, ``%`` in front for a share printed in percent (``%.2f``: 0.994 →
99.40), ``s`` for a text taken as it is, ``min:sec`` for seconds written as ``1 min 10 s``.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Union

import pytest

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"

Key = Union[str, tuple, Callable[[Callable[[str], Any]], Any]]


@dataclass
class Fig:
    page: str
    text: str  # the page's words, "{}" for each figure
    file: str  # the results file the page cites for them
    keys: tuple[Key, ...]
    fmt: str | tuple[str, ...] = "%.2f"

    @property
    def formats(self) -> tuple[str, ...]:
        return self.fmt if isinstance(self.fmt, tuple) else (self.fmt,) * len(self.keys)


@lru_cache(maxsize=None)
def load(name: str) -> Any:
    path = RESULTS / name
    return json.loads(path.read_text()) if path.suffix == ".json" else path.read_text()


def lookup(data: Any, path: str) -> Any:
    for seg in path.split("/"):
        if seg.startswith("re:"):
            m = re.search(seg[3:], data)
            assert m, f"{seg[3:]!r} not found"
            data = m.group(1)
        elif isinstance(data, list) and seg.startswith("id="):
            data = next(e for e in data if str(e.get("id")) == seg[3:])
        elif isinstance(data, list):
            data = data[int(seg)]
        else:
            data = data[seg]
    return data


def value(fig: Fig, key: Key) -> Any:
    if callable(key):
        return key(load)
    if isinstance(key, tuple):
        return lookup(load(key[0]), key[1])
    return lookup(load(fig.file), key)


def render(v: Any, spec: str) -> str:
    if spec == "s":
        return str(v)
    if spec == "min:sec":
        m, s = divmod(round(float(v)), 60)
        return f"{m} min {s} s"
    if spec.startswith("%"):
        return format(100 * float(v), spec[1:])
    return format(v, spec)


def norm(text: str) -> str:
    return re.sub(r"\s+", " ", text.replace("\u2212", "-"))


def find(page: str, text: str) -> int | None:
    """Where ``text`` stands on ``page`` (any whitespace for a space, either minus sign), or None."""
    pattern = r"\s+".join("".join("[-\u2212]" if c == "-" else re.escape(c) for c in w)
                          for w in norm(text).strip().split(" "))
    m = re.search(pattern, page)
    return m.start() if m else None


def section(page: str, pos: int) -> str:
    """The part of ``page`` between the level-1/2 headings around ``pos`` (outside code blocks)."""
    heads, fence = [], False
    for m in re.finditer(r"(?m)^.*$", page):
        line = m.group(0)
        if re.match(r"\s*(```|~~~)", line):
            fence = not fence
        elif not fence and re.match(r"#{1,2} ", line):
            heads.append(m.start())
    start = max([h for h in heads if h <= pos], default=0)
    end = min([h for h in heads if h > pos], default=len(page))
    return page[start:end]


def pts(file: str, col: str) -> Callable:
    """The adaptive column's lead over ``col`` in points (a positive number: the page says "fewer")."""
    return lambda j: -100 * j(file)["iwwc"]["adaptive_minus_column"][col]["difference"]


def lead_range(cols: tuple[str, ...], which: Callable) -> Callable:
    files = ("adaptive-demo-200-quick-cpu.json", "adaptive-mnist-quick-cpu.json", "adaptive-resnet18-heldout-quick-cpu.json")
    return lambda j: which(pts(f, c)(j) for f in files for c in cols)


def transfer_gain(which: Callable) -> Callable:
    def f(j):
        r = j("pipeline-demo-quick-cpu.json")["result"]
        return which(100 * (r["robust_accuracy"][k] - r["base_robust_accuracy"][k]) for k in r["robust_accuracy"]
                     if k.startswith("tr-"))
    return f


def set_seconds(file: str, nine: bool) -> Callable:
    def f(j):
        s = j(file)["iwwc"]["set_seconds"]
        return sum(v for k, v in s.items() if k != "adaptive") if nine else s["adaptive"]
    return f


P, A, AU = "pipeline-demo-quick-cpu.json", "audit-demo-quick-cpu.json", "adaptive-demo-200-quick-cpu.json"
M, R, R16 = "adaptive-mnist-quick-cpu.json", "adaptive-resnet18-quick-cpu.json", "adaptive-resnet18-16-quick-cpu.json"
R8, RC, REP = "adaptive-resnet18-eps8-quick-cpu.json", "adaptive-resnet18-cost-idle-cpu.json", "reproduce-cpu-quick.json"
AD1 = "adaptive-demo-quick-cpu.json"
C = "audit/checks/"


def res(col: str) -> tuple[str, str]:
    return f"result/robust_accuracy/{col}", f"result/robust_accuracy_std/{col}"


def column_row(label: str, file: str, col: str, base_fmt: str = "%.1f") -> Fig:
    """A row of docs/adaptive.md's column tables: base, defended mean ± std, adaptive − column ± se."""
    return Fig("docs/adaptive.md", f"| {label} | {{}} | {{}} ± {{}} | {{}} ± {{}} |", file,
               (f"iwwc/base_columns/{col}", f"iwwc/columns/{col}/0", f"iwwc/columns/{col}/1",
                f"iwwc/adaptive_minus_column/{col}/difference", f"iwwc/adaptive_minus_column/{col}/standard_error"),
               (base_fmt, "%.2f", "%.2f", "%.1f", "%.1f"))


def worst_rows(file: str, base: str = "%.1f") -> list[Fig]:
    page = "docs/adaptive.md"
    return [
        Fig(page, "| **Adaptive‡** | | **{} ± {}** (majority {}, all draws {}) | |", file,
            ("iwwc/columns/adaptive/0", "iwwc/columns/adaptive/1", "iwwc/result/scores/defended/adaptive/majority",
             "iwwc/result/scores/defended/adaptive/all_draws"), ("%.2f", "%.2f", "%g", "%g")),
        Fig(page, "| IW-WC, the paper's nine | {} | {} ± {} (majority {}, all draws {}) | |", file,
            ("iwwc/base_iw_wc", "iwwc/iw_wc_paper/0", "iwwc/iw_wc_paper/1", "iwwc/iw_wc_paper/2",
             "iwwc/iw_wc_paper/3"), (base, "%.2f", "%.2f", "%g", "%g")),
        Fig(page, "| IW-WC, all ten | {} | {} ± {} (majority {}, all draws {}) | |", file,
            ("iwwc/base_iw_wc", "iwwc/iw_wc_ten/0", "iwwc/iw_wc_ten/1", "iwwc/iw_wc_ten/2", "iwwc/iw_wc_ten/3"),
            (base, "%.2f", "%.2f", "%g", "%g")),
    ]


def verdict(check: int, bold: bool = True) -> Callable:
    """An audit check's verdict as the page writes it: ``**flag**`` (``flag`` unbolded) or ``ok``."""
    def f(j):
        v = next(c for c in j(A)["audit"]["checks"] if c["id"] == check)["verdict"]
        return ("**flag**" if bold else "flag") if v == "flag" else v
    return f


def flagged_list(j) -> str:
    """The checks the demo audit flagged, as the page lists them: "3, 7, 8 and 9"."""
    ids = [str(i) for i in j(A)["audit"]["flags"]]
    return ", ".join(ids[:-1]) + " and " + ids[-1] if len(ids) > 1 else "".join(ids)


COLUMNS = [("AA (direct)", "aa"), ("RayS (direct)", "rays"), ("APGD+EoT (direct)", "apgd-eot"),
           ("Tr-APGD-CE", "tr-apgd-ce"), ("Tr-APGD-CW", "tr-apgd-cw"), ("Tr-APGD-tgt-DLR", "tr-apgd-t-dlr"),
           ("Tr-AA", "tr-aa"), ("Tr-RayS", "tr-rays"), ("Tr-APGD+EoT", "tr-apgd-eot")]

FIGURES: list[Fig] = [
    # --- README: what it finds -------------------------------------------------------------------------------------
    Fig("README.md", "first 200 test images, LO-IR at `block3`, k = {} of {} chosen by `igd calibrate-k`", P,
        ("result/k", "result/n_neurons"), "d"),
    Fig("README.md", "| clean | {} | {} ± {} |", P,
        ("result/base_clean_accuracy", "result/clean_accuracy", "result/clean_accuracy_std")),
    Fig("README.md", "| IW-WC over the paper's nine attacks | {} | {} ± {} |", P,
        ("result/base_worst_case", "result/iw_wc_paper", "result/iw_wc_paper_std")),
    Fig("README.md", "| IW-WC over ten (with igd's adaptive attack) | — | {} ± {} |", P,
        ("result/worst_case", "result/worst_case_std")),
    Fig("README.md", "leave {} to {} points more images correct on the defence than on the base model", P,
        (transfer_gain(min), transfer_gain(max)), ".1f"),
    Fig("README.md", "does not move beyond the draws' spread ({} ± {} % against {} % over the nine)", P,
        ("result/iw_wc_paper", "result/iw_wc_paper_std", "result/base_worst_case")),
    Fig("README.md", "are weaker than the same attacks transferred ({} ± {} % vs {} ± {} %, check 7)", A,
        (C + "id=7/figures/direct_worst/mean", C + "id=7/figures/direct_worst/std",
         C + "id=7/figures/transfer_worst/mean", C + "id=7/figures/transfer_worst/std")),
    Fig("README.md", "the defence keeps {} % against those attacks, not {} % (check 8)", A,
        (C + "id=8/figures/frozen/mean", C + "id=8/figures/randomized/mean")),
    Fig("README.md", "first {} test images) says why", A, ("audit/n_examples",), "d"),
    Fig("README.md", "the demo {} ± {} % against {} ± {} % (200 digits", AU,
        ("iwwc/columns/adaptive/0", "iwwc/columns/adaptive/1", "iwwc/columns/tr-apgd-ce/0",
         "iwwc/columns/tr-apgd-ce/1")),
    Fig("README.md", "the MNIST example {} ± {} % against {} ± {} %", M,
        ("iwwc/columns/adaptive/0", "iwwc/columns/adaptive/1", "iwwc/columns/tr-apgd-ce/0",
         "iwwc/columns/tr-apgd-ce/1")),
    Fig("README.md", "ε = 1/255 {} ± {} % against {} ± {} % ({} images", "adaptive-resnet18-heldout-quick-cpu.json",
        ("iwwc/columns/adaptive/0", "iwwc/columns/adaptive/1", "iwwc/columns/tr-apgd-ce/0",
         "iwwc/columns/tr-apgd-ce/1", "iwwc/n"), ("%.2f",) * 4 + ("d",)),
    Fig("README.md", "base-model IW-WC {}, {} and {} %", AU,
        ("iwwc/base_iw_wc", (M, "iwwc/base_iw_wc"), ("adaptive-resnet18-heldout-quick-cpu.json", "iwwc/base_iw_wc")),
        "%.1f"),
    Fig("README.md", "It leaves {} to {} points fewer images correct than AutoAttack and APGD+EoT", AU,
        (lead_range(("aa", "apgd-eot"), min), lead_range(("aa", "apgd-eot"), max)), ".1f"),
    Fig("README.md", "(the demo {} and {}, MNIST {} and {}, the ResNet-18 {} and {})", AU,
        (pts(AU, "aa"), pts(AU, "apgd-eot"), pts(M, "aa"), pts(M, "apgd-eot"),
         pts("adaptive-resnet18-heldout-quick-cpu.json", "aa"), pts("adaptive-resnet18-heldout-quick-cpu.json", "apgd-eot")),
        ".1f"),
    Fig("README.md", "and {} to {} points fewer than RayS run on it", AU,
        (lead_range(("rays",), min), lead_range(("rays",), max)), ".1f"),
    Fig("README.md", "APGD+EoT column: {}–{}× on the ResNet-18", RC,
        ("ratio_adaptive_over_apgd_eot/16", "ratio_adaptive_over_apgd_eot/32"), ".2f"),
    Fig("README.md", "igd's exact implementation computed it {}× faster", REP, (r"ranking_cost/re:(\d+)×",), "s"),
    Fig("README.md", "with a largest difference of {}.", REP, (r"ranking_cost/re:×\s*│\s*(\S+)",), "s"),
    Fig("README.md", "{}× with smoothing ({}× with the two passes as separate calls), {}× without smoothing", REP,
        ("overhead/rows/2/median_ratio", "overhead/rows/3/median_ratio", "overhead/rows/1/median_ratio"), ".2f"),
    Fig("README.md", "It took {} on a 2-core CPU with nothing else running", P, ("wall_seconds",), "min:sec"),
    Fig("docs/results.md", "held-out test images 200..399. {} s wall with nothing else", P, ("wall_seconds",), "g"),
    Fig("docs/results.md", "attack decisions\ntaken by repeated draws) took {} s for the same command", P,
        ("baseline/wall_seconds",), "g"),
    Fig("docs/results.md", "(ratio\n{}), with a worst case over ten of {} % where this code gives {} %", P,
        ("ratio_wall_seconds", "baseline/result/worst_case", "result/worst_case"), (".2f", "%.2f", "%.2f")),
    # --- docs/results.md: the demo pipeline --------------------------------------------------------------------------
    Fig("docs/results.md", "calibrate-k → k = {} of {}, ε = {}, σ = 0.1", P,
        ("result/k", "result/n_neurons", "result/eps"), ("d", "d", "g")),
    Fig("docs/results.md", "| clean | {} | {} ± {} | −0.10 |", P,
        ("result/base_clean_accuracy", "result/clean_accuracy", "result/clean_accuracy_std")),
    *[Fig("docs/results.md", f"| {label}† | {{}} | ≥ {{}} ± {{}} ({{}}{' images attacked' if col == 'aa' else ''}) | |",
          P, (f"result/base_robust_accuracy/{col}", *res(col), f"result/measured_on_survivors/{col}"),
          ("%.2f", "%.2f", "%.2f", "d"))
      for label, col in (("AA", "aa"), ("RayS", "rays"), ("APGD+EoT", "apgd-eot"))],
    *[Fig("docs/results.md", f"| {label} | {{}} | {{}} ± {{}} | {{}} |", P,
          (f"result/base_robust_accuracy/{col}", *res(col),
           lambda j, c=col: 100 * (j(P)["result"]["robust_accuracy"][c] - j(P)["result"]["base_robust_accuracy"][c])),
          ("%.2f", "%.2f", "%.2f", "+.2f"))
      for label, col in COLUMNS[3:]],
    Fig("docs/results.md", "| Adaptive‡† | — | ≥ {} ± {} ({}) | |", P, (*res("adaptive"), "result/measured_on_survivors/adaptive"),
        ("%.2f", "%.2f", "d")),
    Fig("docs/results.md", "| **IW-WC, the paper's nine** | **{}** | **{} ± {}** (majority {}, all draws {}) | **{}** |", P,
        ("result/base_worst_case", "result/iw_wc_paper", "result/iw_wc_paper_std", "result/iw_wc_paper_majority",
         "result/iw_wc_paper_all_draws",
         lambda j: 100 * (j(P)["result"]["iw_wc_paper"] - j(P)["result"]["base_worst_case"])),
        ("%.2f",) * 5 + ("+.2f",)),
    Fig("docs/results.md", "| **IW-WC, all ten** | {} | **{} ± {}** (majority {}, all draws {}) | {} |", P,
        ("result/base_worst_case", "result/worst_case", "result/worst_case_std", "result/worst_case_majority",
         "result/worst_case_all_draws",
         lambda j: 100 * (j(P)["result"]["worst_case"] - j(P)["result"]["base_worst_case"])),
        ("%.2f",) * 5 + ("+.2f",)),
    # --- docs/results.md: the audit table ----------------------------------------------------------------------------
    Fig("docs/results.md", "zero gradient on {}/{} images |", A,
        (C + "id=1/figures/zero_gradient_images", C + "id=1/figures/images_checked"), "d"),
    Fig("docs/results.md", "white box {} ± {} %, Square {} ± {} %, RayS {} ± {} % |", A,
        (C + "id=2/figures/whitebox/mean", C + "id=2/figures/whitebox/std",
         C + "id=2/figures/blackbox/square/mean", C + "id=2/figures/blackbox/square/std",
         C + "id=2/figures/blackbox/rays/mean", C + "id=2/figures/blackbox/rays/std")),
    Fig("docs/results.md", "AA {} ± {} % → stronger {} ± {} % (drop {} ± {} points) |", A,
        (C + "id=3/figures/aa/mean", C + "id=3/figures/aa/std", C + "id=3/figures/stronger_aa/mean",
         C + "id=3/figures/stronger_aa/std", C + "id=3/figures/test/estimate", C + "id=3/figures/test/se"),
        ("%.2f",) * 4 + ("%+.1f", "%.1f")),
    Fig("docs/results.md", "FGSM {} % → 5 / 10 / 20 steps {} / {} / {} % |", A,
        tuple(C + f"id=4/figures/curve/{i}/mean" for i in range(4))),
    Fig("docs/results.md", "ε {} % → 2ε {} % → 4ε {} % |", A,
        tuple(C + f"id=5/figures/curve/{i}/mean" for i in range(3))),
    Fig("docs/results.md", "direct {} ± {} % vs transferred {} ± {} % ({} ± {} points) |", A,
        (C + "id=7/figures/direct_worst/mean", C + "id=7/figures/direct_worst/std",
         C + "id=7/figures/transfer_worst/mean", C + "id=7/figures/transfer_worst/std",
         C + "id=7/figures/test/estimate", C + "id=7/figures/test/se"), ("%.2f",) * 4 + ("%+.1f", "%.1f")),
    Fig("docs/results.md", "fresh noise {} ± {} % vs frozen {} % ({} ± {} points) |", A,
        (C + "id=8/figures/randomized/mean", C + "id=8/figures/randomized/std", C + "id=8/figures/frozen/mean",
         C + "id=8/figures/test/estimate", C + "id=8/figures/test/se"), ("%.2f",) * 3 + ("%+.1f", "%.1f")),
    Fig("docs/results.md", "clean: {} % of draws; APGD+EoT points: {} ± {} % |", A,
        (C + "id=9/figures/clean/mean", C + "id=9/figures/apgd-eot/mean", C + "id=9/figures/apgd-eot/std")),
    Fig("docs/results.md", "IW-WC {} ± {} % vs smoothing alone {} ± {} % ({} ± {} points) vs base {} % |", A,
        (C + "id=10/figures/defended/mean", C + "id=10/figures/defended/std",
         C + "id=10/figures/smoothing_alone/mean", C + "id=10/figures/smoothing_alone/std",
         C + "id=10/figures/test/estimate", C + "id=10/figures/test/se", C + "id=10/figures/base/mean"),
        ("%.2f",) * 4 + ("%+.1f", "%.1f", "%.2f")),
    Fig("docs/results.md", "nine columns {} ± {} % vs ten {} ± {} % (lower by {} ± {} points) |", A,
        (C + "id=11/figures/iw_wc_paper/mean", C + "id=11/figures/iw_wc_paper/std",
         C + "id=11/figures/iw_wc_ten/mean", C + "id=11/figures/iw_wc_ten/std", C + "id=11/figures/lowered_by",
         C + "id=11/figures/standard_error")),
]

# docs/results.md: skipping in IW-WC
SKIP = "iwwc-skip-demo-quick-cpu.json"
FIGURES += [
    Fig("docs/results.md", f"| {label} | {{}} | {{}} | {{}} | {{}} | {{}} ± {{}} % |", SKIP,
        (f"per_direct_attack/{col}/images_skip", f"per_direct_attack/{col}/images_no-skip",
         f"per_direct_attack/{col}/seconds_skip", f"per_direct_attack/{col}/seconds_no-skip",
         f"tables/no-skip/robust_accuracy/{col}", f"tables/no-skip/robust_accuracy_std/{col}"),
        ("d", "d", ".2f", ".2f", "%.2f", "%.2f"))
    for label, col in (("AutoAttack", "aa"), ("APGD+EoT", "apgd-eot"), ("RayS", "rays"))
] + [
    Fig("docs/results.md", "The worst case is the same either way — {} ± {} % (majority {} %, all draws {} %), base {} %",
        SKIP, ("worst_case/skip/worst_case", "worst_case/skip/worst_case_std", "worst_case/skip/worst_case_majority",
               "worst_case/skip/worst_case_all_draws", "base_worst_case")),
    Fig("docs/results.md", "skipping makes the defended phase {}× faster ({} s vs {} s; the whole run {}×)", SKIP,
        ("ratio_defended_phase", "defended_seconds/skip", "defended_seconds/no-skip", "ratio_whole_run"),
        (".2f", ".2f", ".2f", ".2f")),
]

# docs/results.md: several masked layers
for file, rows in (("layers-demo-cpu.json", ("`block3`", "`block2` + `block3`")),
                   ("layers-resnet18-cpu.json", ("`layer4`", "`layer3` + `layer4`"))):
    FIGURES.append(Fig("docs/results.md", "| none (base model) | — | {} | {} | — | — |", file,
                       ("0/rows/0/evaluation/base_clean_accuracy", "0/rows/0/evaluation/base_worst_case")))
    for i, label in enumerate(rows):
        ev = f"0/rows/{i}/evaluation/"
        FIGURES.append(Fig("docs/results.md", f"| {label} | {{}} | {{}} ± {{}} | **{{}} ± {{}}** | {{}} | {{}} |", file,
                           (lambda j, f=file, i=i: ", ".join(
                               f"{k} of {n}" for k, n in zip(
                                   (j(f)[0]["rows"][i]["k"].values() if isinstance(j(f)[0]["rows"][i]["k"], dict)
                                    else [j(f)[0]["rows"][i]["k"]]),
                                   (j(f)[0]["rows"][i]["n_neurons"].values()
                                    if isinstance(j(f)[0]["rows"][i]["n_neurons"], dict)
                                    else [j(f)[0]["rows"][i]["n_neurons"]]))),
                            ev + "clean_accuracy", ev + "clean_accuracy_std", ev + "worst_case", ev + "worst_case_std",
                            ev + "worst_case_majority", ev + "worst_case_all_draws"), ("s",) + ("%.2f",) * 6))
FIGURES += [
    Fig("docs/results.md", "{} s for both masks at load average 3.4–3.9", "layers-demo-cpu.json",
        (lambda j: sum(s["seconds"] for s in j("layers-demo-cpu.json")),), ".0f"),
    Fig("docs/results.md", "{} s for both masks at load average 2.0–2.1", "layers-resnet18-cpu.json",
        (lambda j: sum(s["seconds"] for s in j("layers-resnet18-cpu.json")),), ".0f"),
]

# docs/results.md: scale
SCALE_STAGES = [("resnet50", 0, "load (model and images: the baseline)"), ("resnet50", 1, "rank LO-IR (closed form, 2048 × 1000)"),
                ("resnet50", 2, "rank random"), ("resnet50", 3, "calibrate-k, binary search (12 k evaluated)"),
                ("resnet50", 4, "calibrate-k --k 750"), ("resnet50", 5, "defend-eval, clean (5 + 5 draws)"),
                ("resnet50", 6, "attack APGD-CE, 2 steps, 2 images, on the defence"),
                ("wrn", 7, "load (the baseline)"), ("wrn", 8, "rank LO-IR (closed form, 640 × 100)"), ("wrn", 9, "rank random"),
                ("wrn", 10, "calibrate-k, binary search (11 k evaluated)"), ("wrn", 11, "calibrate-k --k 50"),
                ("wrn", 12, "defend-eval, clean (5 + 5 draws)"), ("wrn", 13, "attack APGD-CE, 2 steps, 2 images, on the defence")]
for _, i, stage in SCALE_STAGES:
    FIGURES.append(Fig("docs/results.md", f"| {stage} | {{}} ({{}} + {{}}) | {{}} | {{}} MB | {{}} MB |", "scale-cpu.json",
                       (f"rows/{i}/seconds", f"rows/{i}/load_seconds", f"rows/{i}/work_seconds", f"rows/{i}/x_forward",
                        f"rows/{i}/after_load_mb", f"rows/{i}/stage_extra_mb"), (".2f", ".2f", ".2f", ".1f", "d", "d")))

# docs/results.md: the paper reproduction run, analyses
DEMO, RN = "models/demo/", "models/resnet18/"
FIGURES += [
    Fig("docs/results.md", "| calibrate-k's k (64 images), LO-IR vs random ranking | {} vs {} | {} vs {} |", REP,
        (DEMO + "calibrate-lo-ir/k", DEMO + "calibrate-random/k", RN + "calibrate-lo-ir/k", RN + "calibrate-random/k"),
        "d"),
    Fig("docs/results.md", "Costs (ResNet-18 `layer4`, N = 512): exact LO-IR {}× faster than the literal algorithm", REP,
        (r"ranking_cost/re:(\d+)×",), "s"),
    Fig("docs/results.md", "(largest difference {}); the defended forward {}× a base forward with smoothing ({}× with "
        "separate passes), {}× without", REP,
        (r"ranking_cost/re:×\s*│\s*(\S+)", "overhead/rows/2/median_ratio", "overhead/rows/3/median_ratio",
         "overhead/rows/1/median_ratio"), ("s", ".2f", ".2f", ".2f")),
]
SH = "shift-demo-cpu.json"
FIGURES += [
    Fig("docs/results.md", "| demo, ε = 0.2, k = {} | {} | {} | {} | {} | {} | {} | {} |", SH,
        ("result/k", *(f"result/groups/successful/percent/{g}" for g in ("gt", "pred", "rest", "unimp")),
         *(f"result/groups/unsuccessful/percent/{g}" for g in ("gt", "rest", "unimp"))),
        ("d", "+.1f", "+.1f", "+.1f", "+.1f", "+.1f", "+.1f", "+.1f")),
    Fig("docs/results.md", "all 450 test digits: {} successful attacks, {} unsuccessful, {} wrong when clean", SH,
        ("result/groups/successful/n", "result/groups/unsuccessful/n", "result/clean_wrong"), "d"),
    Fig("docs/results.md", "Robust accuracy under this PGD-50: {} %.", SH, ("result/attack/robust_accuracy",)),
]
AB = "analysis-demo-cpu.json"
for i, (passes, masking) in enumerate((("1", "none"), ("1", "none"), ("2", "none"), ("2", "random-13"),
                                       ("2", "random-13"), ("2", "LO-IR-13"), ("2", "LO-IR-13"))):
    f = f"ablation/rows/{i}/figures/"
    smooth = i in (1, 4, 6)
    keys = (f + "clean", f + "clean_std", f + "aa", f + "aa_std", f + "iw_wc", f + "iw_wc_std") if smooth else \
        (f + "clean", f + "aa", f + "iw_wc")
    cells = "{} ± {} | {} ± {} | {} ± {}" if smooth else "{} | {} | {}"
    FIGURES.append(Fig("docs/results.md", f"| {i + 1} | {passes} | {masking} | {'✓' if smooth else '✗'} | {cells} |",
                       AB, keys))
FIGURES += [
    Fig("docs/results.md", "| clean % | {} | {} ± {} | {} ± {} | {} ± {} | {} ± {} | {} |", AB,
        ("sweep_k/points/0/clean", *(f"sweep_k/points/{i}/{k}" for i in (1, 2, 3, 4) for k in ("clean", "clean_std")),
         "sweep_k/points/5/clean")),
    Fig("docs/results.md", "| AA % | {} ± {} | {} ± {} | {} ± {} | {} ± {} | {} ± {} | {} |", AB,
        (*(f"sweep_k/points/{i}/{k}" for i in (0, 1, 2, 3, 4) for k in ("robust", "robust_std")),
         "sweep_k/points/5/robust")),
    Fig("docs/results.md", "| clean % | {} | {} | {} ± {} | {} ± {} |", AB,
        ("sweep_sigma/points/0/clean", "sweep_sigma/points/1/clean",
         *(f"sweep_sigma/points/{i}/{k}" for i in (2, 3) for k in ("clean", "clean_std")))),
    Fig("docs/results.md", "| AA % | {} | {} ± {} | {} ± {} | {} ± {} |", AB,
        ("sweep_sigma/points/0/robust", *(f"sweep_sigma/points/{i}/{k}" for i in (1, 2, 3)
                                           for k in ("robust", "robust_std")))),
]

# docs/adaptive.md: the demo, MNIST and ResNet-18 tables
FIGURES += [column_row(label, AU, col) for label, col in COLUMNS] + worst_rows(AU)
FIGURES += [column_row(label, M, col) for label, col in COLUMNS] + worst_rows(M)
FIGURES += [column_row(label, R, col) for label, col in COLUMNS]
FIGURES += [
    Fig("docs/adaptive.md", "| held-out test digits 200..399 (%) | **{} ± {}** | {} ± {} | {} ± {} | {} ± {} |", AU,
        tuple(f"sweep/temperatures/{t}/{k}" for t in ("1.0", "2.0", "5.0", "10.0") for k in ("robust_accuracy", "std"))),
    Fig("docs/adaptive.md", "| first 100, earlier attacks (%) | {} ± {} | {} ± {} | **{} ± {}** | {} ± {} |", AD1,
        tuple(f"sweep/temperatures/{t}/{k}" for t in ("1.0", "2.0", "5.0", "10.0") for k in ("robust_accuracy", "std"))),
    Fig("docs/adaptive.md", "Clean: base {} %, defended {} ± {} %. The first measurement", AU,
        ("iwwc/base_clean", "iwwc/clean/0", "iwwc/clean/1"), ("%.1f", "%.2f", "%.2f")),
    Fig("docs/adaptive.md", "Clean: base {} %, defended {} ± {} %.\n\nThe adaptive attack alone is below", M,
        ("iwwc/base_clean", "iwwc/clean/0", "iwwc/clean/1"), ("%.1f", "%.2f", "%.2f")),
    Fig("docs/adaptive.md", "adaptive / nine = **{}** ({} s against {} s; {}× the direct APGD+EoT column, {} s)", AU,
        ("iwwc/wall_time_ratio_adaptive_over_nine", "iwwc/set_seconds/adaptive", set_seconds(AU, True),
         lambda j: j(AU)["iwwc"]["set_seconds"]["adaptive"] / j(AU)["iwwc"]["set_seconds"]["apgd-eot"],
         "iwwc/set_seconds/apgd-eot"), (".3f", ".1f", ".1f", ".1f", ".1f")),
    Fig("docs/adaptive.md", "adaptive / nine = **{}** ({} s against {} s for the nine columns' sets on 100 images; {}× the "
        "direct APGD+EoT column alone: {} s per image against {} s)", M,
        ("iwwc/wall_time_ratio_adaptive_over_nine", "iwwc/set_seconds/adaptive", set_seconds(M, True),
         lambda j: j(M)["iwwc"]["set_seconds"]["adaptive"] / j(M)["iwwc"]["set_seconds"]["apgd-eot"],
         "iwwc/set_seconds_per_image/adaptive", "iwwc/set_seconds_per_image/apgd-eot"),
        (".3f", ".1f", ".0f", ".2f", ".2f", ".2f")),
    Fig("docs/adaptive.md", "Cost: adaptive / nine = **{}** on 32 images ({} s against {} s, the sets' own seconds) and "
        "**{}** on 16 ({} s against {} s)", R,
        ("iwwc/wall_time_ratio_adaptive_over_nine", "iwwc/set_seconds/adaptive", set_seconds(R, True),
         (R16, "iwwc/wall_time_ratio_adaptive_over_nine"), (R16, "iwwc/set_seconds/adaptive"), set_seconds(R16, True)),
        (".2f", ".1f", ".0f", ".3f", ".1f", ".0f")),
    Fig("docs/adaptive.md", "the two runs disagreed ({}× on 32 images, {}× on 16)", R,
        (lambda j: j(R)["iwwc"]["set_seconds"]["adaptive"] / j(R)["iwwc"]["set_seconds"]["apgd-eot"],
         lambda j: j(R16)["iwwc"]["set_seconds"]["adaptive"] / j(R16)["iwwc"]["set_seconds"]["apgd-eot"]),
        (".0f", ".1f")),
    Fig("docs/adaptive.md", "{} and {} s per image on 16 images ({}×), {} and {} s per image on 32 ({}×)", RC,
        (lambda j: j(RC)["rows"][0]["seconds"] / 16, lambda j: j(RC)["rows"][1]["seconds"] / 16,
         "ratio_adaptive_over_apgd_eot/16", lambda j: j(RC)["rows"][2]["seconds"] / 32,
         lambda j: j(RC)["rows"][3]["seconds"] / 32, "ratio_adaptive_over_apgd_eot/32"), ".2f"),
    Fig("docs/adaptive.md", "with the same accuracies as in the runs above ({} / {} % and {} / {} %)", RC,
        ("rows/0/robust_accuracy", "rows/2/robust_accuracy", "rows/1/robust_accuracy", "rows/3/robust_accuracy"),
        "%.1f"),
    Fig("docs/adaptive.md", "the 32-image run's APGD+EoT set took {} s per image, as idle, and its adaptive set {} s", R,
        ("iwwc/set_seconds_per_image/apgd-eot", "iwwc/set_seconds_per_image/adaptive"), (".2f", ".1f")),
    Fig("docs/adaptive.md", "Cost ratio {} (the adaptive set from the sweep", R8,
        ("iwwc/wall_time_ratio_adaptive_over_nine",), ".2f"),
    Fig("docs/adaptive.md", "(32 images, {} threads, load average {} at start, {} at end; {} min)", R,
        ("threads", "load_at_start/0", "iwwc/load_at_end/0", lambda j: j(R)["iwwc"]["result"]["seconds"]["total"] / 60),
        ("d", ".1f", ".1f", ".0f")),
    Fig("docs/adaptive.md", "(the first 16 of them, {} thread, load {} → {}; {} min)", R16,
        ("threads", "load_at_start/0", "iwwc/load_at_end/0", lambda j: j(R16)["iwwc"]["result"]["seconds"]["total"] / 60),
        ("d", ".1f", ".1f", ".0f")),
    Fig("docs/adaptive.md", "(load average {} at start, {} at end)", M,
        ("load_at_start/0", "iwwc/load_at_end/0"), ".1f"),
    Fig("docs/adaptive.md", "(The JSON records the exact command. Whole run: {} min.)", M,
        (lambda j: j(M)["iwwc"]["result"]["seconds"]["total"] / 60,), ".0f"),
    Fig("docs/adaptive.md", "n = 16 took {} min and n = 32 {} min", R16,
        (lambda j: j(R16)["iwwc"]["result"]["seconds"]["total"] / 60,
         (lambda j: j(R)["iwwc"]["result"]["seconds"]["total"] / 60)), (".1f", ".0f")),
    Fig("docs/adaptive.md", "| demo (ε = 0.2, 200 images) | {} ± {} | {} ± {} (Tr-APGD-CE) | {}–{} | {} → {} | {} | {} |",
        AU, ("iwwc/columns/adaptive/0", "iwwc/columns/adaptive/1", "iwwc/columns/tr-apgd-ce/0",
             "iwwc/columns/tr-apgd-ce/1", "iwwc/columns/aa/0", "iwwc/columns/rays/0", "iwwc/iw_wc_paper/0",
             "iwwc/iw_wc_ten/0", "iwwc/base_iw_wc", "iwwc/wall_time_ratio_adaptive_over_nine"),
        ("%.2f", "%.2f", "%.2f", "%.2f", "%.1f", "%.1f", "%.2f", "%.2f", "%.1f", ".3f")),
    Fig("docs/adaptive.md", "| MNIST example (ε = 0.1, 100) | {} ± {} | {} ± {} (Tr-APGD-CE) | {}–{} | {} → {} | {} | {} |",
        M, ("iwwc/columns/adaptive/0", "iwwc/columns/adaptive/1", "iwwc/columns/tr-apgd-ce/0",
            "iwwc/columns/tr-apgd-ce/1", "iwwc/columns/apgd-eot/0", "iwwc/columns/rays/0", "iwwc/iw_wc_paper/0",
            "iwwc/iw_wc_ten/0", "iwwc/base_iw_wc", "iwwc/wall_time_ratio_adaptive_over_nine"),
        ("%.2f", "%.2f", "%.2f", "%.2f", "%.1f", "%.1f", "%.2f", "%.2f", "%.1f", ".2f")),
    Fig("docs/adaptive.md", "| ResNet-18 (ε = 1/255, 32) | {} ± {} | {} ± {} (Tr-APGD-CE) | {}–{} | {} → {} | {} | {}–{} |",
        R, ("iwwc/columns/adaptive/0", "iwwc/columns/adaptive/1", "iwwc/columns/tr-apgd-ce/0",
            "iwwc/columns/tr-apgd-ce/1", "iwwc/columns/apgd-eot/0", "iwwc/columns/rays/0", "iwwc/iw_wc_paper/0",
            "iwwc/iw_wc_ten/0", "iwwc/base_iw_wc", (R16, "iwwc/wall_time_ratio_adaptive_over_nine"),
            "iwwc/wall_time_ratio_adaptive_over_nine"),
        ("%.2f", "%.2f", "%.2f", "%.2f", "%.1f", "%.1f", "%.2f", "%.2f", "%.1f", ".3f", ".2f")),
    Fig("docs/adaptive.md", "| ResNet-18 (ε = 8/255, 16) | {} ± {} | {} ± {} | 0–{} | {} → {} | {} | {} |", R8,
        ("iwwc/columns/adaptive/0", "iwwc/columns/adaptive/1", "iwwc/columns/aa/0", "iwwc/columns/aa/1",
         "iwwc/columns/rays/0", "iwwc/iw_wc_paper/0", "iwwc/iw_wc_ten/0", "iwwc/base_iw_wc",
         "iwwc/wall_time_ratio_adaptive_over_nine"),
        ("%.2f", "%.2f", "%.2f", "%.2f", "%.1f", "%.2f", "%.2f", "%.1f", ".2f")),
    Fig("docs/adaptive.md", "and {}–{} points stronger than the attacks run on the defence itself (AA, APGD+EoT", AU,
        (lead_range(("aa", "apgd-eot"), min), lead_range(("aa", "apgd-eot"), max)), ".0f"),
]

# docs/audit.md: what each check read on the demo defence
FIGURES += [
    Fig("docs/audit.md", "White box (apgd-eot) {} ± {} %; Square {} ± {} %; RayS {} ± {} %; white − RayS {} ± {} points.",
        A, (C + "id=2/figures/whitebox/mean", C + "id=2/figures/whitebox/std", C + "id=2/figures/blackbox/square/mean",
            C + "id=2/figures/blackbox/square/std", C + "id=2/figures/blackbox/rays/mean",
            C + "id=2/figures/blackbox/rays/std", C + "id=2/figures/tests/rays/estimate",
            C + "id=2/figures/tests/rays/se"), ("%.2f",) * 6 + ("%.1f", "%.1f")),
    Fig("docs/audit.md", "AA {} ± {} %; stronger AA {} ± {} %; drop {} ± {} points.", A,
        (C + "id=3/figures/aa/mean", C + "id=3/figures/aa/std", C + "id=3/figures/stronger_aa/mean",
         C + "id=3/figures/stronger_aa/std", C + "id=3/figures/test/estimate", C + "id=3/figures/test/se"),
        ("%.2f",) * 4 + ("%+.1f", "%.1f")),
    Fig("docs/audit.md", "FGSM {} ± {} % → APGD+EoT 5 steps {} ± {} % → 10 steps {} ± {} % → 20 steps {} ± {} %.", A,
        tuple(C + f"id=4/figures/curve/{i}/{k}" for i in range(4) for k in ("mean", "std"))),
    Fig("docs/audit.md", "ε = 0.2: {} ± {} % → 0.4: {} ± {} % → 0.8: {} ± {} %.", A,
        tuple(C + f"id=5/figures/curve/{i}/{k}" for i in range(3) for k in ("mean", "std"))),
    Fig("docs/audit.md", "Direct {} ± {} % vs transferred {} ± {} %, difference {} ± {} points", A,
        (C + "id=7/figures/direct_worst/mean", C + "id=7/figures/direct_worst/std",
         C + "id=7/figures/transfer_worst/mean", C + "id=7/figures/transfer_worst/std",
         C + "id=7/figures/test/estimate", C + "id=7/figures/test/se"), ("%.2f",) * 4 + ("%+.1f", "%.1f")),
    Fig("docs/audit.md", "(AA {} % / transferred {} %; RayS {} % / {} %; APGD+EoT {} % / {} %)", A,
        tuple(C + f"id=7/figures/{side}/{a}/mean" for a in ("aa", "rays", "apgd-eot") for side in ("direct", "transfer"))),
    Fig("docs/audit.md", "Fresh noise {} ± {} % vs frozen noise {} %: a gain of {} ± {} points", A,
        (C + "id=8/figures/randomized/mean", C + "id=8/figures/randomized/std", C + "id=8/figures/frozen/mean",
         C + "id=8/figures/test/estimate", C + "id=8/figures/test/se"), ("%.2f",) * 3 + ("%+.1f", "%.1f")),
    Fig("docs/audit.md", "Clean: {} % (on no image in any draw); APGD+EoT points: {} ± {} % (on {} of", A,
        (C + "id=9/figures/clean/mean", C + "id=9/figures/apgd-eot/mean", C + "id=9/figures/apgd-eot/std",
         C + "id=9/figures/apgd-eot/images_ever"), ("%.2f", "%.2f", "%.2f", "d")),
    Fig("docs/audit.md", "IW-WC: IG-Defense {} ± {} % vs smoothing alone {} ± {} % vs base {} %; gain {} ± {} points", A,
        (C + "id=10/figures/defended/mean", C + "id=10/figures/defended/std",
         C + "id=10/figures/smoothing_alone/mean", C + "id=10/figures/smoothing_alone/std",
         C + "id=10/figures/base/mean", C + "id=10/figures/test/estimate", C + "id=10/figures/test/se"),
        ("%.2f",) * 5 + ("%+.1f", "%.1f")),
    Fig("docs/audit.md", "Nine columns {} ± {} % vs ten {} ± {} %: lower by {} ± {} points", A,
        (C + "id=11/figures/iw_wc_paper/mean", C + "id=11/figures/iw_wc_paper/std",
         C + "id=11/figures/iw_wc_ten/mean", C + "id=11/figures/iw_wc_ten/std", C + "id=11/figures/lowered_by",
         C + "id=11/figures/standard_error")),
    Fig("docs/audit.md", "The adaptive attack alone leaves {} ± {} %", A,
        (C + "id=11/figures/adaptive/mean", C + "id=11/figures/adaptive/std")),
]

# docs/scoring.md: repeated draws vs one draw
PD, PR = "iwwc-protocol-demo-paper-cpu.json", "iwwc-protocol-resnet18-cpu.json"
FIGURES += [
    Fig("docs/scoring.md", "| **IW-WC** | **{}** | **{} ± {}** (majority {}, all draws {}) | **{}** |", PD,
        ("base_worst_case", "worst_case/draws-5/worst_case", "worst_case/draws-5/worst_case_std",
         "worst_case/draws-5/worst_case_majority", "worst_case/draws-5/worst_case_all_draws",
         "worst_case/single-draw/worst_case")),
    Fig("docs/scoring.md", "IW-WC {} ± {} % (majority {} %, all draws {} %) with repeated draws, {} % with one draw, base "
        "model {} %.", PR,
        ("worst_case/draws-5/worst_case", "worst_case/draws-5/worst_case_std", "worst_case/draws-5/worst_case_majority",
         "worst_case/draws-5/worst_case_all_draws", "worst_case/single-draw/worst_case", "base_worst_case")),
]

# docs/calibrate-k.md: the demo's k for three seeds
CK = "calibrate-k-demo-cpu.json"
FIGURES += [
    Fig("docs/calibrate-k.md", f"| {s} | {{}} | {{}} % | {{}} ± {{}} % |", CK,
        (f"runs/{s}/calibrate_k/k", f"runs/{s}/calibrate_k/clean_accuracy", f"runs/{s}/defend_eval/clean_accuracy",
         f"runs/{s}/defend_eval/clean_accuracy_std"), ("d", "%.2f", "%.2f", "%.2f"))
    for s in range(3)
] + [Fig("docs/calibrate-k.md", "Base model: {} %.", CK, ("runs/0/calibrate_k/base_clean_accuracy",))]

# docs/performance.md: clean-only scoring before and after
W = "waste-cpu.json"
for i, model in enumerate(("demo CNN, 360 digits (`block3`)", "CIFAR-10 ResNet-18, 64 images (`layer4`)")):
    c = f"rows/{i}/clean_only_eval/"
    FIGURES.append(Fig("docs/performance.md", f"| {model} | {{}} → {{}} | {{}} → {{}} | {{}}× (rounds {{}}, {{}}, {{}}) |", W,
                       (c + "counts/before/defended_queries_per_image", c + "counts/after/defended_queries_per_image",
                        c + "counts/before/stem_passes_per_image", c + "counts/after/stem_passes_per_image",
                        c + "time_ratio_before_over_after", c + "time_ratios/0", c + "time_ratios/1", c + "time_ratios/2"),
                       ("g", "g", "g", "g", ".2f", ".2f", ".2f", ".2f")))

# --- docs/own-defense.md: the example defences -----------------------------------------------------------------------
OD, OM = "own-defenses-demo-cpu.json", "own-defenses-mnist-cpu.json"
FIGURES.append(Fig("docs/own-defense.md", "Accuracy in %; the base model: {} clean, {} IW-WC.", OD,
                   ("defenses/bit_depth/base_clean", "defenses/bit_depth/base_worst_case")))
FIGURES.append(Fig("docs/own-defense.md", "Accuracy in %; the base model: {} clean, {} IW-WC.", OM,
                   ("defenses/bit_depth/base_clean", "defenses/bit_depth/base_worst_case")))


def flags(file: str, name: str) -> Callable:
    """The audit checks that flag, as the table lists them ("none" for none)."""
    def get(j):
        got = [c for c, a in j(file)["defenses"][name]["audit"].items() if a["verdict"] == "flag"]
        return ", ".join(got) if got else "none"
    return get


def od(file: str, name: str, what: str) -> Callable:
    """``what`` of a defence: ``gap`` (worst case − reference), ``selection`` (the selected points − the strongest
    column, at many draws), ``attack`` (strongest column − reference, at many draws), ``more`` (fall at more draws)."""
    def get(j):
        d = j(file)["defenses"][name]
        m = d.get("many_draws") or {}
        return {"gap": lambda: d["iw_wc"] - d["reference"],
                "margin": lambda: m["worst_case_selected"] - m["worst_case_selected_draws_margin"],
                "selection": lambda: m["worst_case_selected"] - m["columns"][m["best_column"]],
                "attack": lambda: m["columns"][m["best_column"]] - m["reference"],
                "more": lambda: d["iw_wc"] - d["more_draws"]["iw_wc"]}[what]()
    return get


TABLES = ((OD, (("bit_depth", "bit depth (3 bits)", "BPDA-PGD"), ("jpeg", "JPEG-like (quality 75)", "BPDA-PGD"),
                ("random_resize", "random resize + pad", "PGD + EoT"), ("smoothing", "Gaussian noise σ = 0.25", "PGD + EoT"))),
          (OM, (("bit_depth", "bit depth (3 bits)", "BPDA-PGD"), ("jpeg", "JPEG-like (quality 75)", "BPDA-PGD"),
                ("random_resize", "random resize + pad", "PGD + EoT"),
                ("smoothing_mnist", "Gaussian noise σ = 0.1", "PGD + EoT"))))
def best_std(file: str, name: str, group: str) -> Callable:
    """The std over the final draws of the lowest column of ``group`` (``direct`` or ``transfer``)."""
    def get(j):
        d = j(file)["defenses"][name]
        return d["std"][min(d[group], key=d[group].get)]
    return get


for file, rows in TABLES:
    for name, label, ref in rows:
        d = f"defenses/{name}/"
        rand = name in ("random_resize", "smoothing", "smoothing_mnist")
        direct = "{} (RayS; AA and APGD+EoT: no gradient)" if name == "jpeg" else "{}"
        if rand:  # every figure of a randomized defence: mean ± std over the draws
            FIGURES.append(Fig("docs/own-defense.md", f"| {label} | {{}} ± {{}} | {{}} ± {{}} | {{}} ± {{}} | {{}} ± {{}} "
                               f"| {{}} ± {{}} | {ref} {{}} ± {{}} | {{}} | {{}} |", file,
                               (d + "clean", d + "std/clean", d + "direct_best", best_std(file, name, "direct"),
                                d + "transfer_best", best_std(file, name, "transfer"), d + "adaptive",
                                d + "std/adaptive", d + "iw_wc", d + "iw_wc_std", d + "reference", d + "reference_std",
                                d + "images_reference_breaks_igd_does_not", flags(file, name)),
                               ("%.2f",) * 12 + ("d", "s")))
            continue
        FIGURES.append(Fig("docs/own-defense.md",
                           f"| {label} | {{}} | {direct} | {{}} | {{}} | {{}} | {ref} {{}} | {{}} | {{}} |", file,
                           (d + "clean", d + "direct_best", d + "transfer_best", d + "adaptive", d + "iw_wc",
                            d + "reference", d + "images_reference_breaks_igd_does_not", flags(file, name)),
                           ("%.2f",) * 6 + ("d", "s")))
for file, name, label in ((OD, "random_resize", "demo, random resize + pad"),
                          (OD, "smoothing", "demo, Gaussian noise σ = 0.25"),
                          (OM, "random_resize", "MNIST, random resize + pad"),
                          (OM, "smoothing_mnist", "MNIST, Gaussian noise σ = 0.1")):
    d = f"defenses/{name}/"
    best = lambda j, file=file, name=name: j(file)["defenses"][name]["many_draws"]["best_column"]  # noqa: E731
    col = lambda j, file=file, name=name: (lambda m: m["columns"][m["best_column"]])(  # noqa: E731
        j(file)["defenses"][name]["many_draws"])
    FIGURES.append(Fig("docs/own-defense.md",
                       f"| {label} | {{}} ± {{}} | {{}} ± {{}} | {{}} ± {{}} | {{}} ({{}}) | {{}} | {{}}; {{}} | {{}} |",
                       file, (d + "iw_wc", d + "iw_wc_std", d + "more_draws/iw_wc", d + "more_draws/iw_wc_std",
                              d + "draws_margin/iw_wc", d + "draws_margin/iw_wc_std", col, best,
                              d + "many_draws/reference", d + "many_draws/worst_case_selected",
                              d + "many_draws/worst_case_selected_draws_margin",
                              d + "many_draws/per_image_best_candidate"),
                       ("%.2f",) * 7 + ("s",) + ("%.2f",) * 4))
    short = label.replace("MNIST,", "MNIST example,")
    FIGURES.append(Fig("docs/scoring.md", f"| {short} | {{}} | {{}} | {{}} |", file,
                       (d + "many_draws/worst_case_selected", d + "many_draws/worst_case_selected_draws_margin", col)))
# the prose's ranges over the four randomized rows
FOUR = ((OD, "random_resize"), (OD, "smoothing"), (OM, "random_resize"), (OM, "smoothing_mnist"))


def spread(what: str, pick: Callable) -> Callable:
    return lambda j: pick(od(f, n, what)(j) for f, n in FOUR)


FIGURES += [
    Fig("docs/own-defense.md", "the points the worst case kept are {} to {} points less adversarial than its "
        "strongest column's", OM, (spread("selection", min), spread("selection", max)), ("%.2f", "%.2f")),
    Fig("docs/own-defense.md", "points it selects are {} to {} points more adversarial at 64 draws than those the "
        "first-scored rule selects (demo Gaussian noise {} → {} %), and against random resize on the demo they go "
        "below the reference ({} % against {} %)", OD,
        (spread("margin", min), spread("margin", max), "defenses/smoothing/many_draws/worst_case_selected",
         "defenses/smoothing/many_draws/worst_case_selected_draws_margin",
         "defenses/random_resize/many_draws/worst_case_selected_draws_margin",
         "defenses/random_resize/many_draws/reference")),
    Fig("docs/own-defense.md", "at `--draws 20` the worst case falls by {} to {} points (demo Gaussian noise {} → {} %)",
        OM, (spread("more", min), spread("more", max), (OD, "defenses/smoothing/iw_wc"),
             (OD, "defenses/smoothing/more_draws/iw_wc")), ("%.2f",) * 4),
    Fig("docs/own-defense.md", "igd's strongest column is within {} points of the reference on three of the four (below "
        "it for random resize on the demo), and {} points above it against Gaussian noise on the demo", OM,
        (lambda j: max(abs(od(f, n, "attack")(j)) for f, n in FOUR if n != "smoothing"),
         od(OD, "smoothing", "attack")), ("%.2f", "%.2f")),
    Fig("docs/own-defense.md", "by {} points for random resize and {} for Gaussian noise", OM,
        (od(OM, "random_resize", "gap"), od(OM, "smoothing_mnist", "gap")), ("%.2f", "%.2f")),
    Fig("docs/own-defense.md", "This model is adversarially trained (base IW-WC {} %): JPEG-like ({} %) and random "
        "resize ({} ± {} %) end above it, bit depth ({} %) and Gaussian noise ({} ± {} %) below it", OM,
        ("defenses/bit_depth/base_worst_case", "defenses/jpeg/iw_wc", "defenses/random_resize/iw_wc",
         "defenses/random_resize/iw_wc_std", "defenses/bit_depth/iw_wc", "defenses/smoothing_mnist/iw_wc",
         "defenses/smoothing_mnist/iw_wc_std")),
    Fig("docs/own-defense.md", "igd's worst case reaches the EoT reference** ({} ± {} % against {} ± {} %)", OD,
        ("defenses/random_resize/iw_wc", "defenses/random_resize/iw_wc_std", "defenses/random_resize/reference",
         "defenses/random_resize/reference_std")),
    Fig("docs/own-defense.md", "resize and Gaussian noise also cost clean accuracy: {} ± {} % and {} ± {} %)", OD,
        ("defenses/random_resize/clean", "defenses/random_resize/std/clean", "defenses/smoothing/clean",
         "defenses/smoothing/std/clean")),
    Fig("docs/own-defense.md", "Bit depth: the best direct attack leaves {} % (APGD+EoT {} %: its gradient is zero), "
        "BPDA {} %", OD, ("defenses/bit_depth/direct_best", "defenses/bit_depth/direct/apgd-eot",
                          "defenses/bit_depth/reference"), ("%.0f",) * 3),
    Fig("docs/own-defense.md", "the worst case is {} ± {} % against the reference's {} ± {} %, the adaptive column "
        "alone {} ± {} %", OD, ("defenses/smoothing/iw_wc", "defenses/smoothing/iw_wc_std", "defenses/smoothing/reference",
                                "defenses/smoothing/reference_std", "defenses/smoothing/adaptive",
                                "defenses/smoothing/std/adaptive")),
]
FIGURES.append(Fig("docs/own-defense.md", "random resize flags check 6 — its summary: \"{}\"", OM,
                   (lambda j: j(OM)["defenses"]["random_resize"]["audit"]["6"]["summary"].split(";")[0] + ")",), "s"))
# docs/scoring.md: the worst case above its strongest column, at 5 and 20 draws


def strongest(file: str, name: str, at: str) -> Callable:
    """The lowest column's accuracy at 5 draws (``at="adaptive"``) or at more (``"more_draws"``), which the page
    names as the adaptive column."""
    def get(j):
        d = j(file)["defenses"][name]
        cols = {**d["direct"], **d["transfer"], "adaptive": d["adaptive"]} if at == "adaptive" else \
            d[at]["columns"]
        assert min(cols, key=cols.get) == "adaptive", cols
        return cols["adaptive"]
    return get


def strongest_std(file: str, name: str, at: str) -> Callable:
    """The std over the final draws of that column."""
    return lambda j: (j(file)["defenses"][name]["std"] if at == "adaptive" else
                      j(file)["defenses"][name][at]["columns_std"])["adaptive"]
for file, name, label in ((OD, "smoothing", "demo, σ = 0.25"), (OM, "smoothing_mnist", "MNIST example, σ = 0.1")):
    d = f"defenses/{name}/"
    FIGURES.append(Fig("docs/scoring.md", f"| {label} | {{}} ± {{}} | {{}} ± {{}} | {{}} ± {{}} | {{}} ± {{}} | {{}} ± {{}} "
                       "| {} ± {} |", file,
                       (d + "iw_wc", d + "iw_wc_std", strongest(file, name, "adaptive"),
                        strongest_std(file, name, "adaptive"), d + "more_draws/iw_wc", d + "more_draws/iw_wc_std",
                        strongest(file, name, "more_draws"), strongest_std(file, name, "more_draws"),
                        d + "draws_margin/iw_wc", d + "draws_margin/iw_wc_std", strongest(file, name, "draws_margin"),
                        strongest_std(file, name, "draws_margin"))))


def figure_id(fig: Fig) -> str:
    return f"{fig.page}: {fig.text[:60]}"


def test_the_table_is_not_empty_and_counts_its_figures():
    n = sum(len(f.keys) for f in FIGURES)
    assert len(FIGURES) > 100 and n > 400, (len(FIGURES), n)


@pytest.mark.parametrize("fig", FIGURES, ids=figure_id)
def test_each_quoted_figure_is_its_results_files(fig: Fig):
    page = (ROOT / fig.page).read_text()
    assert len(fig.formats) == len(fig.keys) == fig.text.count("{}"), "entry: one format and key per {}"
    want = fig.text.format(*(render(value(fig, k), spec) for k, spec in zip(fig.keys, fig.formats)))
    pos = find(page, want)
    assert pos is not None, f"{fig.page} does not say: {want!r}"
    assert fig.file in section(page, pos), f"{fig.page}: {fig.file} is not cited in the section that quotes {want!r}"


def test_a_changed_figure_fails():
    """The check is not vacuous: a figure one digit off is not found on the page."""
    fig = FIGURES[1]
    page = (ROOT / fig.page).read_text()
    figures = [render(value(fig, k), s) for k, s in zip(fig.keys, fig.formats)]
    right = fig.text.format(*figures)
    wrong = fig.text.format(*(["99.60"] + figures[1:]))
    assert find(page, right) is not None and find(page, wrong) is None


def test_the_papers_gain_the_readme_quotes_is_the_methods_table():
    """README's range of the paper's IW-WC gains is the range of docs/method.md's table of the paper's numbers."""
    table = (ROOT / "docs" / "method.md").read_text().split("## The paper's headline numbers", 1)[1]
    gains = [float(b.split("/")[1]) - float(a.split("/")[1])
             for a, b in re.findall(r"^\| [^|]+ \| ([\d.]+ / [\d.]+) \| ([\d.]+ / [\d.]+) \|$", table, re.M)]
    assert len(gains) == 4
    readme = norm((ROOT / "README.md").read_text())
    assert f"+{min(gains):.2f} to +{max(gains):.2f} points of IW-WC" in readme

# docs/adaptive.md: the ResNet-18's calibration (the mask made again)
CR = "calibrate-k-resnet18-eps1-cpu.json"
FIGURES += [
    Fig("docs/adaptive.md", "(ResNet-18, standard training: {} % clean on the {} test images)", CR,
        ("calibrate_k/base_clean_accuracy", "calibrate_k/n_examples"), ("%.1f", "d")),
    Fig("docs/adaptive.md", "LO-IR at `layer4` on all {} images of `cifar10-train-4660`", CR, ("rank/n_probe",), "d"),
    Fig("docs/adaptive.md", "(k = {} of {}; {} % defended clean against {} % base", CR,
        ("calibrate_k/k", "calibrate_k/n_neurons", "calibrate_k/clean_accuracy", "calibrate_k/base_clean_accuracy"),
        ("d", "d", "%.1f", "%.1f")),
]
FIGURES += [
    Fig("README.md", "Then audit the defence it made ({} on the 2-core CPU with nothing else running", A,
        ("wall_seconds",), "min:sec"),
    Fig("docs/audit.md", "5 + 5 draws; {} on a 2-core CPU with nothing else running", A, ("wall_seconds",), "min:sec"),
    Fig("docs/results.md", "(same mask; first {} test images; {} with nothing else running)", A,
        ("audit/n_examples", "wall_seconds"), ("d", "min:sec")),
]


def over_base(file: str, key: str) -> Callable:
    """A defended figure of ``file``'s IW-WC run minus the base model's IW-WC, in points."""
    return lambda j: 100 * (j(file)["iwwc"][key][0] - j(file)["iwwc"]["base_iw_wc"])


FIGURES += [
    Fig("docs/adaptive.md", "within 3 points of the base model's IW-WC (demo {}, MNIST {}, ResNet-18 {}), under IW-WC "
        "within 2 (demo {}, MNIST {}, ResNet-18 {})", AU,
        (lambda j: 100 * (j(AU)["iwwc"]["columns"]["adaptive"][0] - j(AU)["iwwc"]["base_iw_wc"]),
         lambda j: 100 * (j(M)["iwwc"]["columns"]["adaptive"][0] - j(M)["iwwc"]["base_iw_wc"]),
         lambda j: 100 * (j(R)["iwwc"]["columns"]["adaptive"][0] - j(R)["iwwc"]["base_iw_wc"]),
         over_base(AU, "iw_wc_paper"), over_base(M, "iw_wc_paper"), over_base(R, "iw_wc_paper")),
        ("+.1f", "+.1f", ".0f", "+.1f", "+.1f", ".0f")),
    Fig("docs/adaptive.md", "| stage 1 alone (igd's apgd-eot on the smoothed first pass) | {} ± {} |", AU,
        ("ablation/variants/stage 1 alone/robust_accuracy", "ablation/variants/stage 1 alone/std")),
    Fig("docs/adaptive.md", "| both stages, stage 2 on the true (saturated) gradient, no BPDA | {} ± {} |", AU,
        ("ablation/variants/stage 2 without BPDA/robust_accuracy", "ablation/variants/stage 2 without BPDA/std")),
    Fig("docs/adaptive.md", "| the adaptive attack (both stages, BPDA) | {} ± {} |", AU,
        ("iwwc/columns/adaptive/0", "iwwc/columns/adaptive/1")),
    Fig("docs/adaptive.md", "every set made in one run: {} min at load 4–8, ablation {} min)", AU,
        (lambda j: (sum(t["seconds"] for t in j(AU)["sweep"]["temperatures"].values())
                    + j(AU)["iwwc"]["result"]["seconds"]["total"]) / 60,
         lambda j: sum(v["seconds"] for v in j(AU)["ablation"]["variants"].values()) / 60), (".1f", ".0f")),
]
FIGURES += [
    Fig("docs/adaptive.md", "it scores {} % clean and {} % under PGD-20 on the 2000 held-out digits",
        "mnist-example-train-cpu.json", ("clean_accuracy", "pgd_accuracy")),
]

# --- the demo audit's verdicts, as docs/results.md's table and docs/audit.md's check sections state them -----------
AUDIT_ROWS = ((1, "AutoAttack flags", "AutoAttack warns"), (2, "black box vs white box", "White box (apgd-eot)"),
              (3, "stronger AutoAttack", "AA"), (4, "attack steps", "FGSM"), (5, "budget", "ε = 0.2:"),
              (6, "loss surface", "The grid beats"), (7, "transfer vs direct", "Direct"),
              (8, "frozen noise", "Fresh noise"), (9, "does the mask act?", "Clean:"), (10, "smoothing alone", "IW-WC:"),
              (11, "adaptive attack", "Nine columns"))
FIGURES += [Fig("docs/results.md", f"| {i} | {label} | {{}} |", A, (verdict(i),), "s") for i, label, _ in AUDIT_ROWS]
FIGURES += [Fig("docs/audit.md", f"- **Demo defence: {{}}{' (clean)' if i == 9 else ''}.** {words}", A,
                (verdict(i, bold=False),), "s") for i, _, words in AUDIT_ROWS]
FIGURES += [
    Fig("docs/audit.md", "the paired standard error. It flagged checks {}.", A, (flagged_list,), "s"),
    Fig("docs/audit.md", "the drop's lower bound at z = 2 ({} points) stays just under the 2-point threshold", A,
        (C + "id=3/figures/test/lower",), "%.1f"),
]

# docs/results.md: restarts in one run against single runs combined
RS = "restarts-demo-quick-cpu.json"
FIGURES += [
    Fig("docs/results.md", "| 3 restarts in one run | {} ± {} | {} |", RS,
        ("one_run_of_restarts/mean", "one_run_of_restarts/std", "one_run_of_restarts/seconds"), ("%.2f", "%.2f", "g")),
    Fig("docs/results.md", "| 3 one-restart runs, per image the worst | {} ± {} | {} |", RS,
        ("single_runs_combined/mean", "single_runs_combined/std", "single_runs_combined/seconds"),
        ("%.2f", "%.2f", "g")),
    Fig("docs/results.md", "| each one-restart run alone | {} / {} / {} | |", RS,
        tuple(f"each_single_run/{i}/mean" for i in range(3))),
    Fig("docs/results.md", "the draws' spread ({} of {} images decided differently", RS,
        ("images_decided_differently", "n_images"), "d"),
    Fig("docs/results.md", "(the pipeline's LO-IR k = {} mask, σ = 0.1), first {} test images", RS, ("k", "n_images"), "d"),
]

# docs/same-answer.md: what the image-keyed noise costs
NC = "noise-keying-cost-cpu.json"


def _noise(row: int, what: str) -> Callable:
    def f(j):
        r = j(NC)["rows"][row]
        if what == "ratio":
            return r["ratio_image_over_content"]
        kind, stat = what.split(":")
        return r["median_s"][kind] if stat == "median" else (min if stat == "min" else max)(r["seconds"][kind])
    return f


FIGURES += [
    Fig("docs/same-answer.md", "(20 queries of 128 images) {} s against {} s (ratio {}, within these short runs' "
        "spread: {}–{} s against {}–{} s)", NC,
        (_noise(0, "image-keyed:median"), _noise(0, "content-keyed:median"), _noise(0, "ratio"),
         _noise(0, "image-keyed:min"), _noise(0, "image-keyed:max"), _noise(0, "content-keyed:min"),
         _noise(0, "content-keyed:max")), (".2f",) * 7),
    Fig("docs/same-answer.md", "RayS at its 10,000 queries on 16 images {} s against {} s ({})", NC,
        (_noise(1, "image-keyed:median"), _noise(1, "content-keyed:median"), _noise(1, "ratio")), (".1f", ".1f", ".2f")),
    Fig("docs/same-answer.md", "quick budgets on 40 images {} s against {} s ({})", NC,
        (_noise(2, "image-keyed:median"), _noise(2, "content-keyed:median"), _noise(2, "ratio")), (".1f", ".1f", ".2f")),
]

FIGURES += [
    Fig("README.md", "against the same noise without a mask the defence's worst case differs by {} ± {} points (check 10)",
        A, (C + "id=10/figures/test/estimate", C + "id=10/figures/test/se"), ("%.1f", "%.1f")),
]

# docs/gpu.md: bf16 LO-IR at ResNet-18's layer3
PL = "precision-layer3-cpu.json"
FIGURES += [
    Fig("docs/gpu.md", "| 40 CIFAR-10 (train) | {} / {} (neurons 0–{}; the test's bound", PL,
        ("layers/0/agreement/mean", "layers/0/agreement/worst", lambda j: j(PL)["layers"][0]["neurons"][1] - 1),
        (".3f", ".3f", "d")),
    Fig("docs/gpu.md", "the top-k sets fall below that bound: {} / {} on the same 40 images and neurons, against {} / {} now, "
        "and {} % of the importance entries come out exactly 0 ({} % in fp32)", PL,
        ("layers/0/logit_rounding/agreement/mean", "layers/0/logit_rounding/agreement/worst", "layers/0/agreement/mean",
         "layers/0/agreement/worst",
         "layers/0/logit_rounding/zero_share", "layers/0/fp32_zero_share"), (".3f", ".3f", ".3f", ".3f", "%.1f", "%.2f")),
]

# docs/adaptive.md: the MNIST example's prose
FIGURES += [
    Fig("docs/adaptive.md", "{} ± {} points below the strongest\n(Tr-APGD-CE, {} %), {}–{} points below the direct attacks", M,
        (pts(M, "tr-apgd-ce"), lambda j: 100 * j(M)["iwwc"]["adaptive_minus_column"]["tr-apgd-ce"]["standard_error"],
         "iwwc/columns/tr-apgd-ce/0", lambda j: min(pts(M, c)(j) for c in ("aa", "apgd-eot", "rays")),
         lambda j: max(pts(M, c)(j) for c in ("aa", "apgd-eot", "rays"))), (".1f", ".1f", "%.1f", ".0f", ".0f")),
    Fig("docs/adaptive.md", "The direct attacks again leave {}–{} %, against {}–{} % for the same", M,
        (lambda j: min(j(M)["iwwc"]["columns"][c][0] for c in ("aa", "apgd-eot", "rays")),
         lambda j: max(j(M)["iwwc"]["columns"][c][0] for c in ("aa", "apgd-eot", "rays")),
         lambda j: min(j(M)["iwwc"]["columns"][c][0] for c in ("tr-apgd-ce", "tr-apgd-cw", "tr-apgd-t-dlr", "tr-aa",
                                                               "tr-apgd-eot")),
         lambda j: max(j(M)["iwwc"]["columns"][c][0] for c in ("tr-apgd-ce", "tr-apgd-cw", "tr-apgd-t-dlr", "tr-aa",
                                                               "tr-apgd-eot"))), "%.0f"),
    Fig("docs/adaptive.md", "IW-WC over ten is {} points below IW-WC over nine ({} against {} %)", M,
        (lambda j: 100 * (j(M)["iwwc"]["iw_wc_paper"][0] - j(M)["iwwc"]["iw_wc_ten"][0]), "iwwc/iw_wc_ten/0",
         "iwwc/iw_wc_paper/0"), (".1f", "%.2f", "%.2f")),
]
FIGURES += [
    Fig("docs/adaptive.md", "({}× and {}× the direct APGD+EoT column on MNIST and the", M,
        (lambda j: j(M)["iwwc"]["set_seconds"]["adaptive"] / j(M)["iwwc"]["set_seconds"]["apgd-eot"],
         lambda j: j(AU)["iwwc"]["set_seconds"]["adaptive"] / j(AU)["iwwc"]["set_seconds"]["apgd-eot"]), ".1f"),
    Fig("docs/adaptive.md", "adaptive column costs {}–{} % of the nine on CPU", M,
        (lambda j: 100 * min(j(f)["iwwc"]["wall_time_ratio_adaptive_over_nine"] for f in (AU, M, R, R16, R8)),
         lambda j: 100 * max(j(f)["iwwc"]["wall_time_ratio_adaptive_over_nine"] for f in (AU, M, R, R16, R8))), ".2g"),
]

# docs/adaptive.md: the ResNet-18 measured again
RH = "adaptive-resnet18-heldout-quick-cpu.json"
FIGURES += [
    Fig("docs/adaptive.md", "(k = {} of 512, as before; the same {} images and budgets, the CPU partly shared with a test run, {} min", RH,
        ("k", "iwwc/n", lambda j: j(RH)["iwwc"]["result"]["seconds"]["total"] / 60), ("d", "d", ".0f")),
    Fig("docs/adaptive.md", "adaptive {} ± {} % against the strongest of the nine, Tr-APGD-CE {} ± {} %; direct AA {}, "
        "APGD+EoT {}, RayS {} %; IW-WC nine → ten {} → {} %; base IW-WC {} %; cost adaptive / nine {}.", RH,
        ("iwwc/columns/adaptive/0", "iwwc/columns/adaptive/1", "iwwc/columns/tr-apgd-ce/0", "iwwc/columns/tr-apgd-ce/1",
         "iwwc/columns/aa/0", "iwwc/columns/apgd-eot/0", "iwwc/columns/rays/0", "iwwc/iw_wc_paper/0", "iwwc/iw_wc_ten/0",
         "iwwc/base_iw_wc", "iwwc/wall_time_ratio_adaptive_over_nine"),
        ("%.2f",) * 9 + ("%.1f", ".3f")),
]
