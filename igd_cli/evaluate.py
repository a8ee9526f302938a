"""Evaluation of the defended and base models under attack: one attack, ready-made adversarial sets, or the
paper's image-wise worst case (IW-WC) over nine attacks (METHOD.md "Evaluation"; Appendix B.3, Table 8).

IW-WC: three attacks on the defended model (AutoAttack, RayS, APGD+EoT) and six transferred from the base model
(APGD-CE, APGD-CW, targeted APGD-DLR, AutoAttack, RayS, APGD+EoT; computed once on the base model on every image
and reused by every defence). Every point is scored with :mod:`igd_cli.scoring`: a randomized defence by
repeated draws (per image the candidate with the lowest mean correctness, scored on fresh draws; Croce et al.),
a deterministic model once (the worst case is then the AND over candidates). The transfer sets are scored first
(forward passes), then, with ``skip=True``, each attack on the defended model runs only on the images where it
can still change the worst case (no earlier candidate wrong in every selection draw); such a column is marked
"measured on survivors" (a lower bound of that attack's own accuracy) while the worst case is unchanged: every
attack draws its randomness per image (:mod:`igd_cli.attacks`), so an image's point does not depend on which
other images are attacked with it.

Every attack's set is written to ``workdir`` as an ``adversarial`` artifact as soon as it is done and reused
when its metadata match, so an interrupted run resumes from the attacks it finished. Scoring reseeds the
defence's noise per candidate, so reruns agree; attacks query it on a separate noise stream
(:data:`igd_cli.attacks.base.ATTACK_STREAM`), so the evaluation of a point never replays the attack's draw.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from importlib.metadata import version as _version

import torch
import torch.nn as nn

from .artifacts import file_sha256, load_artifact, read_metadata, save_artifact
from .attacks import ATTACKS, make_attack, run_attack
from .attacks.adaptive import DEFAULT_BPDA_TEMPERATURE, is_defense
from .attacks.base import AttackResult, gather
from .common import Target, check_classes
from .data import ImageSet
from .errors import IgdError
from .scoring import DEFAULT_DRAWS, Score, alive, classify, final_of_selected, final_rows, is_randomized, rows_for

#: the attacks IW-WC runs on the defended model, in the paper's column order
DIRECT = ("aa", "rays", "apgd-eot")
#: the attacks IW-WC computes on the base model and transfers, in the paper's column order
TRANSFER = ("apgd-ce", "apgd-cw", "apgd-t-dlr", "aa", "rays", "apgd-eot")
#: the order the direct attacks run in with skipping (cheapest per broken image first)
DIRECT_RUN_ORDER = ("aa", "apgd-eot", "rays")
#: IW-WC's columns beyond the paper, run on the defended model after the nine (an IG-Defense only): the adaptive
#: attack designed against it (docs/adaptive.md); ``iw_wc_paper`` is the worst case without them
BEYOND_PAPER = ("adaptive",)

LABELS = {"aa": "AA", "aa-rand": "AA-rand", "rays": "RayS", "apgd-eot": "APGD+EoT", "apgd-ce": "APGD-CE",
          "apgd-cw": "APGD-CW", "apgd-t-dlr": "APGD-tgt-DLR", "square": "Square", "pgd": "PGD", "fgsm": "FGSM",
          "adaptive": "Adaptive‡"}
#: the mark of a column beyond the paper in every table (LABELS) and its note
BEYOND_NOTE = ("‡ beyond the paper: the adaptive attack designed against IG-Defense (APGD + EoT on the smoothed "
               "first pass, then on the defence with BPDA through the pseudo-label; docs/adaptive.md)")
#: tolerance when checking that a loaded set lies in the ε-ball (float32 rounding of x ± ε)
BALL_TOL = 1e-5
#: the installed pyautoattack, whose attacks igd composes: a new release may change their points
PYAUTOATTACK_VERSION = _version("pyautoattack")


def column_key(attack: str, transfer: bool) -> str:
    """JSON key of a column: ``tr-NAME`` for a set made on the base model and evaluated on the defence."""
    return f"tr-{attack}" if transfer else attack


def column_label(key: str) -> str:
    if key.startswith("tr-"):
        return "Tr-" + LABELS.get(key[3:], key[3:])
    return LABELS.get(key, key)


@dataclass
class Budgets:
    """Budget overrides (None keeps each attack's paper default)."""

    steps: int | None = None
    restarts: int | None = None
    queries: int | None = None
    eot_iter: int | None = None

    def kwargs(self) -> dict[str, int | None]:
        return {"steps": self.steps, "restarts": self.restarts, "queries": self.queries, "eot_iter": self.eot_iter}


# --- adversarial set artifacts ------------------------------------------------------------------------

def set_meta(model_meta: dict[str, Any], attack_info: dict[str, Any], target_kind: str, data: ImageSet,
             robust_accuracy: float, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Metadata of an adversarial set (the artifact contract): provenance of the attacked model + attack."""
    meta = dict(model_meta)
    meta.update({"attack": attack_info["attack"], "target": target_kind, "eps": attack_info["eps"],
                 "norm": attack_info.get("norm", "Linf"), "budget": attack_info.get("budget", {}),
                 "seed": attack_info.get("seed", 0), "revision": attack_info.get("revision"),
                 "pyautoattack": PYAUTOATTACK_VERSION,
                 "data": {"dataset": data.name, "split": data.split, "n": len(data)}, "data_id": data.identity(),
                 "robust_accuracy": robust_accuracy})
    meta.update(extra or {})
    return meta


def save_adversarial(path: str | Path, result: AttackResult, meta: dict[str, Any]) -> Path:
    """Write an adversarial set atomically (tensors ``x_adv``, ``y``, ``index``)."""
    return save_artifact(path, "adversarial", {"x_adv": result.x_adv.float().contiguous(), "y": result.y.long(),
                                               "index": result.index.long()}, meta)


def load_set(path: str | Path, data: ImageSet, *, eps: float | None = None) -> AttackResult:
    """Load an adversarial set and check it against ``data``: labels, positions, [0, 1] and the ε-ball."""
    art = load_artifact(path, kind="adversarial")
    x_adv, y, index = art["x_adv"].float(), art["y"].long(), art["index"].long()
    n = len(index)
    if x_adv.shape[0] != n or y.shape[0] != n or y.ndim != 1:
        raise IgdError(f"{path}: x_adv, y and index disagree in length")
    d = art.meta.get("data") or {}
    made_on = (art.meta.get("data_id") or {}).get("images")
    if made_on is not None and made_on != data.source_digest():  # by content: a file rewritten in place differs
        raise IgdError(f"{path}: made on other images ({d.get('dataset')}, {d.get('split')}) than those of "
                       f"{data.name} ({data.split}) now")
    if made_on is None and (d.get("dataset") not in (None, data.name) or d.get("split") not in (None, data.split)):
        raise IgdError(f"{path}: made on {d.get('dataset')} ({d.get('split')}), not on {data.name} ({data.split})")
    keep = index < len(data)
    x_adv, y, index = x_adv[keep], y[keep], index[keep]
    if len(index) == 0:
        raise IgdError(f"{path}: holds no image among the first {len(data)}")
    x, y_true = gather(data, index)
    if x.shape[1:] != x_adv.shape[1:]:
        raise IgdError(f"{path}: images of shape {list(x_adv.shape[1:])}, the data has {list(x.shape[1:])}")
    if not torch.equal(y, y_true):
        raise IgdError(f"{path}: labels differ from {data.name} at the stored positions")
    set_eps = float(art.meta.get("eps", eps if eps is not None else math.inf))
    if eps is not None and not math.isclose(set_eps, eps, rel_tol=1e-6, abs_tol=1e-9):
        raise IgdError(f"{path}: made at ε={set_eps:.6g}, not ε={eps:.6g}")
    if x_adv.min() < 0 or x_adv.max() > 1:
        raise IgdError(f"{path}: x_adv leaves [0, 1]")
    if art.meta.get("norm", "Linf") == "Linf" and (x_adv - x).abs().amax() > set_eps + BALL_TOL:
        raise IgdError(f"{path}: x_adv leaves the ε-ball (ε={set_eps:.6g})")
    return AttackResult(x_adv, y, index, float(art.meta.get("seconds", 0.0)), dict(art.meta))


def merge_sets(parts: Sequence[AttackResult]) -> AttackResult:
    """Join sets of the same attack (shards) by position; a position in two parts keeps the first."""
    seen: dict[int, tuple[int, int]] = {}
    for p_i, part in enumerate(parts):
        for r, i in enumerate(part.index.tolist()):
            seen.setdefault(i, (p_i, r))
    order = sorted(seen)
    x = torch.stack([parts[seen[i][0]].x_adv[seen[i][1]] for i in order])
    y = torch.stack([parts[seen[i][0]].y[seen[i][1]] for i in order])
    return AttackResult(x, y, torch.tensor(order, dtype=torch.int64), sum(p.seconds for p in parts),
                        dict(parts[0].info))


def restrict(res: AttackResult, positions: torch.Tensor) -> AttackResult | None:
    """The rows of ``res`` at ``positions`` (in that order), or None if some position is missing."""
    where = {int(i): r for r, i in enumerate(res.index.tolist())}
    rows = [where.get(int(p)) for p in positions.tolist()]
    if any(r is None for r in rows):
        return None
    rows_t = torch.tensor(rows, dtype=torch.int64)
    return AttackResult(res.x_adv[rows_t], res.y[rows_t], positions.clone(), res.seconds, res.info)


# --- results --------------------------------------------------------------------------------------------

@dataclass
class EvalResult:
    """Per-image, per-draw correctness of every candidate point (the clean image, then each column's point in the
    order they were scored) on the base and the defended model, and the figures the scoring protocol derives:
    per column the worse of {clean, that column} and the worst case over all candidates, each selected on the
    selection draws and scored on the final draws (:mod:`igd_cli.scoring`). Accuracies are over all n images.

    Example::

        res = evaluate_defense(target, defense, data, attack="iw-wc", workdir="adv")
        j = res.to_json()  # worst_case (mean over draws), worst_case_std, worst_case_majority, ...
    """

    y: torch.Tensor
    index: torch.Tensor
    classes: list[str]
    clean_base: torch.Tensor  # bool (D, n): see igd_cli.scoring for the draw layout
    clean_defended: torch.Tensor | None
    base: dict[str, torch.Tensor] = field(default_factory=dict)  # column -> bool (D, n), in scoring order
    defended: dict[str, torch.Tensor] = field(default_factory=dict)
    #: column -> number of images attacked, for defended columns measured only on earlier survivors
    survivors_only: dict[str, int] = field(default_factory=dict)
    sets: dict[str, str] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    eps: float | None = None  # None: clean evaluation only
    seed: int = 0
    mode: str = "none"
    protocol: str = "draws"
    #: the defended model's output is random (smoothing), whatever the protocol scored it with
    randomized: bool = False

    @property
    def n(self) -> int:
        return len(self.y)

    def _side(self, defended: bool) -> tuple[torch.Tensor | None, dict[str, torch.Tensor]]:
        return (self.clean_defended, self.defended) if defended else (self.clean_base, self.base)

    def candidates(self, defended: bool = True) -> list[torch.Tensor]:
        """The clean bits, then every column's, in scoring order (selection ties go to the earliest)."""
        clean, cols = self._side(defended)
        return [] if clean is None else [clean, *cols.values()]

    def draws(self, defended: bool = True) -> int:
        """R, the final draws per point (1 for a deterministic model or the single-draw protocol)."""
        clean, _ = self._side(defended)
        return 0 if clean is None else final_rows(clean).shape[0]

    def worst(self, defended: bool = True) -> torch.Tensor | None:
        """The worst case's final draws (R, n): per image the candidate selected over clean and every column, or
        None without any column."""
        cands = self.candidates(defended)
        return final_of_selected(cands) if len(cands) > 1 else None

    def worst_paper(self) -> torch.Tensor | None:
        """The defended worst case over clean and the paper's columns only (without :data:`BEYOND_PAPER`)."""
        if self.clean_defended is None:
            return None
        cols = [b for k, b in self.defended.items() if k not in BEYOND_PAPER]
        return final_of_selected([self.clean_defended, *cols]) if cols else None

    def alive(self, defended: bool = True) -> torch.Tensor:
        """Images where a later candidate could still be selected (see :func:`igd_cli.scoring.alive`)."""
        return alive(self.candidates(defended))

    def rows(self, defended: bool = True) -> list[tuple[str, torch.Tensor]]:
        """(name, final draws) of clean, every column (the worse of clean and it) and the worst case."""
        clean, cols = self._side(defended)
        if clean is None:
            return []
        out = [("clean", final_rows(clean))]
        out += [(k, final_of_selected([clean, v])) for k, v in cols.items()]
        worst = self.worst(defended)
        return out + ([("worst_case", worst)] if worst is not None else [])

    def scores(self, defended: bool = True) -> dict[str, Score]:
        return {name: Score.of(bits) for name, bits in self.rows(defended)}

    def to_json(self) -> dict[str, Any]:
        has_def = self.clean_defended is not None
        base = self.scores(False)
        main = self.scores(True) if has_def else base
        cols = [k for k in main if k not in ("clean", "worst_case")]
        worst = main.get("worst_case")
        base_worst = base.get("worst_case")
        out: dict[str, Any] = {
            "n_examples": self.n,
            "defended": has_def,
            "clean_accuracy": main["clean"].mean,
            "clean_accuracy_std": main["clean"].std,
            "base_clean_accuracy": base["clean"].mean,
            "robust_accuracy": {k: main[k].mean for k in cols},
            "robust_accuracy_std": {k: main[k].std for k in cols},
            "base_robust_accuracy": {k: base[k].mean for k in base if k not in ("clean", "worst_case")},
            "worst_case": None if worst is None else worst.mean,
            "worst_case_std": None if worst is None else worst.std,
            "worst_case_majority": None if worst is None else worst.majority,
            "worst_case_all_draws": None if worst is None else worst.all_draws,
            "base_worst_case": None if base_worst is None else base_worst.mean,
            "draws": self.draws(has_def),
            "protocol": self.protocol,
            "randomized": has_def and (self.randomized or self.draws(has_def) > 1),
            "scores": {"base": {k: s.to_json() for k, s in base.items()},
                       **({"defended": {k: s.to_json() for k, s in main.items()}} if has_def else {})},
            "measured_on_survivors": dict(self.survivors_only),
            "per_class": self.per_class(),
            "eps": self.eps,
            "seed": self.seed,
            "mode": self.mode,
            "sets": dict(self.sets),
            "seconds": {k: round(v, 3) for k, v in self.seconds.items()},
        }
        paper = self.worst_paper() if self.mode == "iw-wc" else None
        if paper is not None:  # the paper's nine columns + clean, beside worst_case over every column
            p = Score.of(paper)
            out.update({"iw_wc_paper": p.mean, "iw_wc_paper_std": p.std, "iw_wc_paper_majority": p.majority,
                        "iw_wc_paper_all_draws": p.all_draws, "iw_wc_paper_score": p.to_json(),
                        "beyond_paper": [k for k in self.defended if k in BEYOND_PAPER]})
        return out

    def correct_matrix(self) -> tuple[list[str], torch.Tensor]:
        """(names, counts rows × images): per image, in how many final draws the row's selected point was
        correct, for clean, each column and the worst case, base then defended (0/1 for a side scored once)."""
        names, rows = [], []
        for side in ("base", "defended"):
            for k, bits in self.rows(side == "defended"):
                names.append(f"{side}:{k}")
                rows.append(bits.sum(0))
        return names, torch.stack(rows)

    def per_class(self) -> dict[str, Any]:
        """Per-class accuracies (mean over draws) of every row of :meth:`correct_matrix` (the paper's Table 11),
        with the class-wise average, best and worst class."""
        names, mat = self.correct_matrix()
        draws = {"base": self.draws(False), "defended": self.draws(True)}
        out: dict[str, Any] = {"classes": list(self.classes), "rows": {}}
        for name, row in zip(names, mat):
            r = draws[name.split(":", 1)[0]]
            accs = []
            for c in range(len(self.classes)):
                sel = self.y == c
                accs.append(int(row[sel].sum()) / (r * int(sel.sum())) if bool(sel.any()) else None)
            present = [a for a in accs if a is not None]
            out["rows"][name] = {"accuracy": accs,
                                 "class_average": sum(present) / len(present) if present else None,
                                 "best": max(present) if present else None,
                                 "worst": min(present) if present else None}
        return out

    def save(self, path: str | Path, meta: dict[str, Any] | None = None) -> Path:
        """Write an ``eval-report`` artifact: ``correct`` (rows × images, final draws correct per row) and the
        per-draw bits of every candidate (``base_draws``, ``defended_draws``: candidates × D × images), from which
        ``igd merge`` recomputes every figure for shards."""
        names, mat = self.correct_matrix()
        tensors = {"correct": mat.to(torch.uint8), "y": self.y, "index": self.index,
                   "base_draws": torch.stack(self.candidates(False)).to(torch.uint8)}
        cands = {"base": ["clean", *self.base]}
        if self.clean_defended is not None:
            tensors["defended_draws"] = torch.stack(self.candidates(True)).to(torch.uint8)
            cands["defended"] = ["clean", *self.defended]
        full = dict(meta or {})
        full.update({"columns": names, "candidates": cands, "protocol": self.protocol,
                     "draws": self.draws(self.clean_defended is not None), "result": self.to_json()})
        return save_artifact(path, "eval-report", tensors, full)

    @classmethod
    def from_tensors(cls, meta: dict[str, Any], tensors: dict[str, torch.Tensor]) -> "EvalResult":
        """Rebuild a result from a saved report's per-draw bits (for ``igd merge`` of shards)."""
        cands = meta.get("candidates")
        if not isinstance(cands, dict) or "base_draws" not in tensors:
            raise IgdError("an eval-report without per-draw results (written by an igd before repeated-draw "
                           "scoring): rerun igd defend-eval to score it")
        r = meta.get("result") or {}

        def side(name: str) -> tuple[torch.Tensor | None, dict[str, torch.Tensor]]:
            if name not in cands:
                return None, {}
            bits = tensors[f"{name}_draws"].bool()
            if bits.shape[0] != len(cands[name]):
                raise IgdError(f"{name}_draws holds {bits.shape[0]} candidates, the metadata names {len(cands[name])}")
            return bits[0], {k: bits[i] for i, k in enumerate(cands[name]) if i > 0}

        clean_b, base = side("base")
        clean_d, dfd = side("defended")
        return cls(tensors["y"].long(), tensors["index"].long(), list(meta.get("classes") or []), clean_b, clean_d,
                   base, dfd, dict(r.get("measured_on_survivors") or {}), dict(r.get("sets") or {}),
                   dict(r.get("seconds") or {}), eps=r.get("eps"), seed=int(r.get("seed", 0)),
                   mode=str(r.get("mode", "none")), protocol=str(meta.get("protocol", r.get("protocol", "draws"))),
                   randomized=bool(r.get("randomized", False)))


# --- the evaluator ---------------------------------------------------------------------------------------

class Evaluator:
    """Runs or reuses attack sets and scores them on the base and defended models (see module doc)."""

    def __init__(self, target: Target, defense: nn.Module | None, data: ImageSet, *, eps: float | None = None,
                 norm: str = "Linf", budgets: Budgets | None = None, seed: int = 0, batch_size: int = 128,
                 workdir: str | Path | None = None, defense_meta: dict[str, Any] | None = None,
                 adv_files: Sequence[str | Path] = (), show_progress: bool = True,
                 on_set: Callable[[str, str, AttackResult], None] | None = None,
                 positions: torch.Tensor | None = None, protocol: str = "draws", draws: int = DEFAULT_DRAWS,
                 bpda_temperature: float | None = None):
        self.target, self.defense, self.data = target, defense, data
        self.bpda_temperature = bpda_temperature  # the adaptive attack's (None: its default)
        self.eps = float(eps) if eps is not None else None  # None: a clean evaluation, which never uses ε
        self.norm, self.seed, self.batch_size = norm, int(seed), batch_size
        self.budgets = budgets or Budgets()
        self.workdir = Path(workdir) if workdir is not None else None
        self.defense_meta = dict(defense_meta or {})
        self.show_progress = show_progress
        self.on_set = on_set
        self.protocol = protocol
        #: classifications per candidate on each model (1: scored once; 2R: R final + R selection draws)
        self.rows = {"base": rows_for(target.model, protocol, draws),
                     "defended": rows_for(defense, protocol, draws) if defense is not None else 0}
        if positions is None:
            self.positions = torch.arange(len(data), dtype=torch.int64)
        else:  # a subset (an evaluation shard): columns are aligned with these absolute positions
            self.positions = torch.as_tensor(positions, dtype=torch.int64).flatten().clone()
            if len(self.positions) == 0 or int(self.positions.min()) < 0 or int(self.positions.max()) >= len(data):
                raise IgdError(f"image positions must lie in 0..{len(data) - 1}")
            if len(torch.unique(self.positions)) != len(self.positions):
                raise IgdError("image positions must be distinct")
        self.x, self.y = gather(data, self.positions)
        #: absolute position -> row of the columns (-1: not evaluated)
        self.row_of = torch.full((len(data),), -1, dtype=torch.int64)
        self.row_of[self.positions] = torch.arange(len(self.positions))
        self.given = self._load_given(adv_files)
        self._clean_bits: dict[str, torch.Tensor] = {}

    # -- sets ------------------------------------------------------------------------------------------
    def _load_given(self, files: Sequence[str | Path]) -> dict[tuple[str, str], tuple[AttackResult, str]]:
        """``--adv`` files grouped by (target kind, attack); shards of one attack are joined."""
        groups: dict[tuple[str, str], list[tuple[AttackResult, str]]] = {}
        fp = self.target.loaded.fingerprint
        for f in files:
            res = load_set(f, self.data, eps=self.eps)
            meta = res.info
            kind = meta.get("target", "base")
            if meta.get("model_fingerprint") != fp:
                raise IgdError(f"{f}: made on model {meta.get('model')} ({meta.get('model_fingerprint')}), not on "
                               f"this base model ({fp})")
            if kind == "defended":
                if self.defense is None:
                    raise IgdError(f"{f}: a set made on a defended model; give its --mask")
                want = self.defense_meta.get("mask_sha256")
                if want is not None and meta.get("mask_sha256") != want:
                    raise IgdError(f"{f}: made on a defence with another mask")
            groups.setdefault((kind, str(meta.get("attack"))), []).append((res, str(f)))
        out = {}
        for key, items in groups.items():
            merged = merge_sets([r for r, _ in items]) if len(items) > 1 else items[0][0]
            out[key] = (merged, ", ".join(p for _, p in items))
            self._check_covers(merged, out[key][1])
        return out

    def _check_covers(self, res: AttackResult, where: str) -> None:
        """A given set must hold every evaluated image: one it lacks would silently count as broken."""
        held = torch.zeros(len(self.data), dtype=torch.bool)
        held[res.index] = True
        missing = int((~held[self.positions]).sum())
        if missing:
            n = len(self.positions)
            hint = (f"pass --n-examples {int(res.index.max()) + 1}"
                    if n == len(self.data) and torch.equal(res.index.sort().values, torch.arange(len(res.index)))
                    else "give every shard of the set")
            raise IgdError(f"{where}: holds {n - missing} of the {n} images evaluated ({missing} missing, which "
                           f"would count as broken): {hint}")

    def _key_meta(self, attack_info: dict[str, Any], kind: str) -> dict[str, Any]:
        key = {"model_fingerprint": self.target.loaded.fingerprint, "attack": attack_info["attack"],
               "target": kind, "eps": round(self.eps, 10), "norm": self.norm, "budget": attack_info["budget"],
               "seed": self.seed, "images": self.data.source_digest(), "pyautoattack": PYAUTOATTACK_VERSION}
        if "revision" in attack_info:  # an attack whose algorithm changed: sets of the old one are not reused
            key["revision"] = attack_info["revision"]
        if kind == "defended":  # the mask by content and the settings, not the mask file's path
            key["defense"] = {k: v for k, v in self.defense_meta.items() if k not in ("mask", "probe")}
        return json.loads(json.dumps(key, sort_keys=True, default=str))  # as it reads back from metadata

    def _path(self, key: dict[str, Any]) -> Path | None:
        if self.workdir is None:
            return None
        digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:12]
        return self.workdir / f"{key['target']}-{key['attack']}-{digest}.safetensors"

    def _model(self, kind: str) -> nn.Module:
        return self.defense if kind == "defended" else self.target.model

    def obtain(self, attack: str, kind: str, positions: torch.Tensor) -> tuple[AttackResult, str, torch.Tensor]:
        """The set of ``attack`` on the ``kind`` model for ``positions`` (a given ``--adv`` set, a matching set
        in the workdir, or a new run, saved to the workdir at once) and its column on that model."""
        if (kind, attack) in self.given:
            res, src = self.given[(kind, attack)]
            part = restrict(res, positions)
            if part is None:
                where = (f"the first {len(self.data)} images" if len(self.positions) == len(self.data) else
                         f"images {int(self.positions.min())}..{int(self.positions.max())}")
                raise IgdError(f"{src}: the {attack} set lacks some of {where}")
            return part, src, self.column(part, kind)
        model = self._model(kind)
        atk = make_attack(attack, model, eps=self.eps, norm=self.norm, seed=self.seed,
                          device=self.target.device, num_classes=self.target.loaded.num_classes,
                          strict=False, **self.budgets.kwargs(), bpda_temperature=self.bpda_temperature)
        info = atk.describe()
        key = self._key_meta(info, kind)
        path = self._path(key)
        if path is not None and path.exists():
            try:
                meta = read_metadata(path)
                if meta.get("kind") == "adversarial" and meta.get("set_key") == key:
                    part = restrict(load_set(path, self.data, eps=self.eps), positions)
                    if part is not None:
                        return part, str(path), self.column(part, kind)
            except IgdError:
                pass  # unreadable or stale: recompute and overwrite
        label = f"{kind} {attack}" + (f" ({len(positions)} survivors)" if len(positions) < len(self.positions) else "")
        res = run_attack(atk, self.data, batch_size=self.batch_size, positions=positions, description=label,
                         show_progress=self.show_progress)
        if self.on_set is not None:
            self.on_set(attack, kind, res)
        bits = self.column(res, kind)
        if path is not None:
            rows = self.row_of[res.index]
            score = Score.of(final_of_selected([self.clean(kind)[:, rows], bits[:, rows]]))
            extra = {"set_key": key, "seconds": round(res.seconds, 3), "n_attacked": len(positions),
                     "batch_size": self.batch_size, **score_meta(score, self.protocol)}
            if kind == "defended":
                extra.update({"defense": self.defense_meta, "mask_sha256": self.defense_meta.get("mask_sha256")})
            save_adversarial(path, res, set_meta(self.target.provenance(), info, kind, self.data, score.mean, extra))
        return res, (str(path) if path is not None else ""), bits

    # -- scoring ---------------------------------------------------------------------------------------
    def clean(self, kind: str) -> torch.Tensor:
        """The clean images' bits (D, n) on the ``kind`` model (computed once)."""
        if kind not in self._clean_bits:
            self._clean_bits[kind] = classify(self._model(kind), self.x, self.y, self.rows[kind], seed=self.seed,
                                              batch_size=self.batch_size, description=self._label(kind, "clean"))
        return self._clean_bits[kind]

    def _label(self, kind: str, what: str) -> str | None:
        """The progress-bar name of a scoring pass (None: no bar)."""
        if not self.show_progress:
            return None
        r = self.rows[kind]
        return f"scoring {kind} {what}" + (f" ({r // 2} + {r // 2} draws)" if r > 1 else "")

    def column(self, res: AttackResult, kind: str) -> torch.Tensor:
        """The set's bits (D, n) over the evaluated positions on the ``kind`` model; an image outside the set
        counts as wrong in every draw (so a column measured on survivors is a lower bound)."""
        bits = classify(self._model(kind), res.x_adv, res.y, self.rows[kind], seed=self.seed,
                        batch_size=self.batch_size, description=self._label(kind, str(res.info.get("attack", "set"))))
        out = torch.zeros(self.rows[kind], len(self.positions), dtype=torch.bool)
        rows = self.row_of[res.index]
        out[:, rows[rows >= 0]] = bits[:, rows >= 0]
        return out


def score_meta(score: Score, protocol: str) -> dict[str, Any]:
    """The metadata of a set's robust accuracy under the protocol (``igd merge`` sums ``score`` over shards)."""
    return {"robust_accuracy_std": score.std, "score": score.to_json(),
            "scoring": {"protocol": protocol, "draws": score.draws}}


def default_workdir(target: Target) -> Path:
    """Where IW-WC keeps its sets by default: ``$IGD_HOME/adv/<model fingerprint>``."""
    from .models import igd_home

    return igd_home() / "adv" / target.loaded.fingerprint


def evaluate_defense(target: Target, defense: nn.Module | None, data: ImageSet, *, attack: str = "none",
                     adv_files: Sequence[str | Path] = (), workdir: str | Path | None = "auto",
                     budgets: Budgets | None = None, eps: float | None = None, norm: str = "Linf", seed: int = 0,
                     batch_size: int = 128, skip: bool = True, base: bool = True,
                     defense_meta: dict[str, Any] | None = None, show_progress: bool = True,
                     on_set: Callable[[str, str, AttackResult], None] | None = None,
                     positions: torch.Tensor | None = None, protocol: str = "draws",
                     draws: int = DEFAULT_DRAWS, bpda_temperature: float | None = None) -> EvalResult:
    """Evaluate ``defense`` (and the base model ``target.model``) on the first ``len(data)`` images.

    ``attack``: ``none`` (clean, plus any ``adv_files``), an attack name (run on the defended model, and on the
    base model for the base column when ``base``), or ``iw-wc`` (the nine attacks; ``adv_files`` are reused
    for the attacks they hold). ``defense=None`` evaluates the base model alone (its IW-WC uses the six base
    sets). ``skip`` runs the IW-WC attacks on the defended model only on images where they can still change the
    worst case. ``protocol``/``draws``: how a randomized model is scored (:mod:`igd_cli.scoring`).
    With an IG-Defense, IW-WC adds the columns :data:`BEYOND_PAPER` (the adaptive attack, BPDA temperature
    ``bpda_temperature``) after the nine; ``iw_wc_paper`` in the JSON is the worst case without them.
    ``workdir``: where sets are kept and reused (``"auto"``: :func:`default_workdir`; None: nowhere).
    ``positions``: evaluate only these positions of ``data`` (an evaluation shard; default all); the result's
    ``index`` holds them, and attacks see the same absolute positions (per-image seeds) as in a whole run.

    Example::

        res = evaluate_defense(target, load_defense(target, "mask.safetensors"), data, attack="iw-wc")
        print(res.to_json()["worst_case"], res.to_json()["worst_case_std"])
    """
    if workdir == "auto":
        workdir = default_workdir(target)
    if attack not in ("none", "iw-wc") and attack not in ATTACKS:
        raise IgdError(f"--attack {attack}: unknown (choose from none, iw-wc, {', '.join(ATTACKS)})")
    check_classes(target, data)
    eps = used_eps(target, eps, attack, adv_files)
    ev = Evaluator(target, defense, data, eps=eps, norm=norm, budgets=budgets, seed=seed, batch_size=batch_size,
                   workdir=workdir, defense_meta=defense_meta, adv_files=adv_files, show_progress=show_progress,
                   on_set=on_set, positions=positions, protocol=protocol, draws=draws,
                   bpda_temperature=bpda_temperature)
    t0 = time.perf_counter()
    has_def = defense is not None
    result = EvalResult(ev.y.clone(), ev.positions.clone(), list(data.classes), ev.clean("base"),
                        ev.clean("defended") if has_def else None, eps=ev.eps, seed=ev.seed, mode=attack,
                        protocol=protocol, randomized=has_def and is_randomized(defense))
    result.seconds["clean"] = time.perf_counter() - t0
    everything = ev.positions

    def add_base_set(name: str, res: AttackResult, src: str, bits: torch.Tensor) -> None:
        """A set made on the base model: the base column and, with a defence, the transfer column."""
        key = column_key(name, True) if has_def else name
        result.base[key] = bits
        if has_def:
            result.defended[key] = ev.column(res, "defended")
        result.sets[key] = src

    # ready-made sets first (cheap: forward passes)
    for (kind, name), (res, src) in ev.given.items():
        if attack == "iw-wc" and ((kind == "base" and name in TRANSFER) or (kind == "defended" and name in DIRECT)):
            continue  # used below, in their place
        if kind == "base":
            add_base_set(name, res, src, ev.column(res, "base"))
        else:
            result.defended[name] = ev.column(res, "defended")
            result.sets[name] = src

    if attack == "iw-wc":
        for name in TRANSFER:
            t = time.perf_counter()
            add_base_set(name, *ev.obtain(name, "base", everything))
            if has_def and name in DIRECT:  # Table 8: the base row's direct columns are its own attacks
                result.base[name] = result.base[column_key(name, True)]
            result.seconds[column_key(name, has_def)] = time.perf_counter() - t
        if has_def:
            beyond = BEYOND_PAPER if is_defense(defense) else ()
            for name in (*DIRECT_RUN_ORDER, *beyond):  # the columns beyond the paper last: the nine are unchanged
                t = time.perf_counter()
                todo = everything[result.alive(True)] if skip else everything
                if len(todo) == 0:
                    result.defended[name] = torch.zeros_like(result.clean_defended)
                    result.survivors_only[name] = 0
                    continue
                res, src, bits = ev.obtain(name, "defended", todo)
                result.defended[name] = bits
                if skip and len(todo) < len(everything):
                    result.survivors_only[name] = len(todo)
                result.sets[name] = src
                result.seconds[name] = time.perf_counter() - t
    elif attack != "none":
        t = time.perf_counter()
        if has_def:
            res, src, result.defended[attack] = ev.obtain(attack, "defended", everything)
            result.sets[attack] = src
            result.seconds[attack] = time.perf_counter() - t
        if base or not has_def:
            t = time.perf_counter()
            res, src, result.base[attack] = ev.obtain(attack, "base", everything)
            result.sets.setdefault(attack if not has_def else f"base:{attack}", src)
            result.seconds[f"base:{attack}"] = time.perf_counter() - t
    result.seconds["total"] = time.perf_counter() - t0
    return result


def defense_identity(mask_path: str | Path, defense: nn.Module | None = None,
                     settings: dict[str, Any] | None = None) -> dict[str, Any]:
    """What identifies a defended model in set metadata: the mask file's sha256 and the defence settings (from the
    artifact the defence was built from, when ``load_defense`` built it: the file is not read again)."""
    art = getattr(defense, "mask_artifact", None)
    if art is not None and Path(art.path) == Path(mask_path) and art.sha256 is not None:
        meta, sha = art.meta, art.sha256
    else:
        meta, sha = read_metadata(mask_path), file_sha256(mask_path)
    out: dict[str, Any] = {"mask": str(mask_path), "mask_sha256": sha, "layer": meta.get("layer"),
                           "k": meta.get("k"), "probe": meta.get("probe")}
    s = dict(meta.get("defense") or {})
    if defense is not None and callable(getattr(defense, "settings", None)):
        s.update(defense.settings())
    elif defense is not None:
        for name in ("tau", "sigma", "n_smooth", "rs"):
            if hasattr(defense, name):
                v = getattr(defense, name)
                s[name] = v.item() if hasattr(v, "item") else v
    s.update(settings or {})
    out["settings"] = s
    return out


def adaptive_temperature(value: float | None) -> float:
    """The adaptive attack's BPDA temperature as used (its default when not given)."""
    return float(DEFAULT_BPDA_TEMPERATURE if value is None else value)


# --- defend-eval as a library call --------------------------------------------------------------------------

def eval_identity(target: Target, ident: dict[str, Any], data: ImageSet, *, attack: str, eps: float | None,
                  norm: str, budgets: Budgets, seed: int, skip: bool, adv: Sequence[str | Path],
                  protocol: str, draws: int) -> dict[str, Any]:
    """What makes two reports parts of one evaluation (``igd merge`` compares it): model, defence (mask sha256
    and settings), data, attack, ε, budgets, seed, scoring protocol, skipping and the given sets (by their attack
    identity, so shards may be given the matching shards of a set)."""
    sets = []
    for f in adv:
        m = read_metadata(f)
        sets.append({k: m.get(k) for k in ("attack", "target", "eps", "norm", "budget", "seed", "model_fingerprint",
                                           "mask_sha256", "revision", "pyautoattack", "data_id")})
    sets.sort(key=lambda d: json.dumps(d, sort_keys=True, default=str))
    out = {"model_fingerprint": target.loaded.fingerprint, "num_classes": target.loaded.num_classes,
           "mask_sha256": ident["mask_sha256"], "layer": ident.get("layer"), "k": ident.get("k"),
           "defense": ident.get("settings"), "data": data.identity(),
           "classes": list(data.classes), "attack": attack, "eps": eps, "norm": norm, "budget": budgets.kwargs(),
           "revisions": attack_revisions(attack), "pyautoattack": PYAUTOATTACK_VERSION,
           "seed": int(seed), "skip": bool(skip), "adv": sets, "protocol": protocol, "draws": int(draws)}
    return json.loads(json.dumps(out, sort_keys=True, default=str))  # as it reads back from metadata


def attack_revisions(attack: str) -> dict[str, int | None]:
    """The algorithm revision of every attack an evaluation runs (part of its identity: a changed algorithm is
    another evaluation)."""
    names = set(DIRECT) | set(TRANSFER) | set(BEYOND_PAPER) if attack == "iw-wc" else \
        ({attack} if attack in ATTACKS else set())
    return {name: ATTACKS[name].revision for name in sorted(names)}


def needs_eps(attack: str, adv: Sequence[str | Path]) -> bool:
    """ε is used only by attacks and to check given sets; a clean evaluation never asks for it."""
    return attack != "none" or bool(adv)


def used_eps(target: Target, eps: float | None, attack: str, adv: Sequence[str | Path]) -> float | None:
    """ε as the evaluation uses it: the given one, else the default (its error says what needs it), None for clean
    accuracy alone, where it is unused."""
    if eps is not None:
        return float(eps)
    if not needs_eps(attack, adv):
        return None
    return float(target.default_eps(f"--attack {attack}" if attack != "none" else "checking the --adv sets"))


def defend_eval(target: Target, defense: nn.Module, mask_path: str | Path, data: ImageSet, *,
                attack: str = "none", adv: Sequence[str | Path] = (), eps: float | None = None, norm: str = "Linf",
                budgets: Budgets | None = None, workdir: str | Path | None = None, skip: bool = True,
                shard: tuple[int, int, int, int] | None = None, seed: int = 0, batch_size: int = 256,
                protocol: str = "draws", draws: int = DEFAULT_DRAWS, report: str | Path | None = None,
                show_progress: bool = True, bpda_temperature: float | None = None
                ) -> tuple[EvalResult, dict[str, Any]]:
    """``igd defend-eval`` between parsing and printing: evaluate the defence from ``mask_path`` (and the base
    model), optionally on one shard of the images (``shard`` = (I, N, start, stop), its sets kept apart in
    ``WORKDIR/shard-I-of-N``), write the eval-report ``report`` (with the identity ``igd merge`` checks) and
    return the result with its JSON (CLI.md keys plus the defence, data, budgets and timings)."""
    t0 = time.perf_counter()
    budgets = budgets or Budgets()
    eps = used_eps(target, eps, attack, adv)
    ident = defense_identity(mask_path, defense)
    identity = eval_identity(target, ident, data, attack=attack, eps=eps, norm=norm, budgets=budgets, seed=seed,
                             skip=skip, adv=adv, protocol=protocol, draws=draws)
    if attack in ("iw-wc", *BEYOND_PAPER):  # the adaptive attack's setting (igd merge compares it)
        identity["bpda_temperature"] = adaptive_temperature(bpda_temperature)
    wd: Path | str = Path(workdir) if workdir is not None else "auto"
    positions = None
    where: dict[str, Any] = {"data": {"dataset": data.name, "split": data.split, "n": len(data)},
                             "probe": ident.get("probe")}  # the mask's ranking images
    if shard is not None:
        # each shard keeps its sets apart, so shards sharing a workdir (a cluster's shared disk) never overwrite
        # each other's sets and each resumes its own
        wd = (Path(workdir) if workdir is not None else default_workdir(target)) / f"shard-{shard[0]}-of-{shard[1]}"
        positions = torch.arange(shard[2], shard[3], dtype=torch.int64)
        where.update({"shard": [shard[0], shard[1]], "positions": [shard[2], shard[3]]})
    res = evaluate_defense(target, defense, data, attack=attack, adv_files=adv, workdir=wd, budgets=budgets,
                           eps=eps, norm=norm, seed=seed, batch_size=batch_size, skip=skip, defense_meta=ident,
                           positions=positions, protocol=protocol, draws=draws, show_progress=show_progress,
                           bpda_temperature=bpda_temperature)
    result = res.to_json()
    result.update({"mask": str(mask_path), "layer": ident.get("layer"), "k": getattr(defense, "k", ident.get("k")),
                   "defense": defense.settings() if callable(getattr(defense, "settings", None)) else None,
                   "attack": attack, "batch_size": batch_size, "budget": budgets.kwargs(), "skip": skip,
                   **({"bpda_temperature": identity["bpda_temperature"]} if "bpda_temperature" in identity else {}),
                   "workdir": str(default_workdir(target) if wd == "auto" else wd), **where,
                   "seconds_total": time.perf_counter() - t0})
    if report is not None:
        res.save(report, {**target.provenance(), **ident, "eval_identity": identity, "classes": list(data.classes),
                          "attack": attack, "eps": res.eps, "norm": norm, "budget": budgets.kwargs(), "seed": seed,
                          "skip": skip, "batch_size": batch_size, "n_examples": res.n,
                          "seconds": round(time.perf_counter() - t0, 3), **where})
        result["report"] = str(report)
    return res, result


# --- rendering ----------------------------------------------------------------------------------------

def scoring_note(r: dict[str, Any]) -> str:
    """One sentence saying how the defended figures were produced (the protocol and its draws)."""
    if not r.get("defended"):
        return "base model: deterministic, every point scored once (exact)"
    if not r.get("randomized"):
        return "defence deterministic (no smoothing): every point scored once, all figures exact"
    if r.get("protocol") == "single-draw":
        return ("single-draw protocol: one noise draw per set and the AND over sets — a near-boundary point is a "
                "coin toss per draw, so this mixes attack strength with noise (not comparable with the literature)")
    d = r["draws"]
    return (f"randomized defence scored as Croce et al. (ICML 2022): every point classified {d} times, per image the "
            f"point with the lowest mean correctness selected, scored on {d} fresh draws; mean over those draws "
            f"(± sample std); base model deterministic: exact")


@dataclass
class TableCells:
    """The cells of the base-vs-defended table (plain strings), shared by the terminal (Rich) and Markdown
    renderings: ``sections`` holds the row index where each section starts, ``notes`` the lines under it."""

    title: str
    caption: str
    headers: list[str]
    rows: list[list[str]]
    sections: list[int] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def table_cells(result: EvalResult | dict[str, Any], title: str | None = None) -> TableCells:
    """The paper's Table 8 for one defence, transposed: rows clean, each attack and the worst case, columns base
    model, + IG-Defense and Δ (accuracies in %, defended ones mean over draws). A column measured on survivors (†)
    is a lower bound: shown as ``≥`` and given no Δ. A randomized defence gets three worst-case rows: mean ± std
    over draws, majority vote and correct in all draws."""
    r = result.to_json() if isinstance(result, EvalResult) else result
    has_def = bool(r.get("defended"))
    keys = list(dict.fromkeys(list(r["robust_accuracy"]) + list(r["base_robust_accuracy"])))
    order = [*DIRECT, *[column_key(a, True) for a in TRANSFER], *BEYOND_PAPER]
    keys.sort(key=lambda k: (order.index(k) if k in order else len(order), k))
    surv = r.get("measured_on_survivors", {})
    draws = int(r.get("draws") or 1)
    eps = f", ε={r['eps']:.4g}" if r.get("eps") is not None else ""
    headers = ["attack", "base model"]
    if has_def:
        headers += ["+ IG-Defense" + (f" (mean of {draws} draws)" if draws > 1 else ""), "Δ (points)"]
    t = TableCells(title or f"accuracy (%), {r['n_examples']} images{eps}", scoring_note(r), headers, [])

    def fmt(v: float | None) -> str:
        return "—" if v is None else f"{100 * v:.2f}"

    def row(name: str, b: float | None, d: float | None, *, bound: bool = False, std: float | None = None) -> None:
        if not has_def:
            t.rows.append([name, fmt(b)])
            return
        cell = ("≥ " if bound else "") + fmt(d) + (f" ± {100 * std:.2f}" if std is not None and d is not None else "")
        gain = "" if bound or b is None or d is None else f"{100 * (d - b):+.2f}"
        t.rows.append([name, fmt(b), cell, gain])

    row("Clean", r["base_clean_accuracy"], r["clean_accuracy"], std=r.get("clean_accuracy_std") if draws > 1 else None)
    for k in keys:
        row(column_label(k) + ("†" if k in surv else ""), r["base_robust_accuracy"].get(k),
            r["robust_accuracy"].get(k) if has_def else None, bound=k in surv)
    worst_name = "IW-WC" if r.get("mode") == "iw-wc" else "worst case"
    b_worst = r.get("base_worst_case")
    if has_def and r.get("worst_case") is not None and draws > 1:
        t.sections.append(len(t.rows))
        row(f"{worst_name}, mean ± std", b_worst, r["worst_case"], std=r.get("worst_case_std"))
        row(f"{worst_name}, majority vote", b_worst, r.get("worst_case_majority"))
        row(f"{worst_name}, correct in all {draws} draws", b_worst, r.get("worst_case_all_draws"))
        if r.get("beyond_paper"):
            t.sections.append(len(t.rows))
            row(f"{worst_name} of the paper's nine, mean ± std", b_worst, r.get("iw_wc_paper"),
                std=r.get("iw_wc_paper_std"))
            row(f"{worst_name} of the paper's nine, majority vote", b_worst, r.get("iw_wc_paper_majority"))
            row(f"{worst_name} of the paper's nine, all {draws} draws", b_worst, r.get("iw_wc_paper_all_draws"))
    elif b_worst is not None or r.get("worst_case") is not None:
        t.sections.append(len(t.rows))
        row(worst_name, b_worst, r.get("worst_case") if has_def else None)
        if has_def and r.get("beyond_paper"):
            row(f"{worst_name} of the paper's nine", b_worst, r.get("iw_wc_paper"))
    if r.get("beyond_paper"):
        t.notes.append(BEYOND_NOTE + f"; {worst_name} is over every column, \"{worst_name} of the paper's nine\" "
                       "without it.")
    if surv:
        t.notes.append("† measured only on the images where it could still change the worst case "
                       f"({', '.join(f'{column_label(k)}: {v}' for k, v in surv.items())} images attacked; the "
                       "others count as broken): a lower bound of that attack's own accuracy, so no Δ; the worst "
                       "case is that of --no-skip (every attack gives an image the same point in any batch; "
                       "--no-skip gives every attack's own accuracy).")
    return t


def render_table(result: EvalResult | dict[str, Any], console=None, title: str | None = None) -> None:
    """:func:`table_cells` printed as a Rich table, with its notes below."""
    from rich.table import Table

    from .console import out_console

    console = console or out_console
    cells = table_cells(result, title)
    t = Table(title=cells.title, caption=cells.caption, caption_justify="left")
    for i, h in enumerate(cells.headers):
        t.add_column(h, justify="left" if i == 0 else "right")
    for i, row in enumerate(cells.rows):
        if i in cells.sections:
            t.add_section()
        t.add_row(*row)
    console.print(t)
    for note in cells.notes:
        console.print(note)


def render_per_class(result: EvalResult | dict[str, Any], console=None) -> None:
    """Class-wise average, best and worst class (the paper's Table 11) for every row (means over draws)."""
    from rich.table import Table

    from .console import out_console

    console = console or out_console
    r = result.to_json() if isinstance(result, EvalResult) else result
    pc = r["per_class"]
    t = Table(title="class-wise accuracy (%)")
    for col in ("row", "class average", "best class", "worst class"):
        t.add_column(col, justify="right" if col != "row" else "left")
    for name, row in pc["rows"].items():
        t.add_row(name, *[("—" if row[k] is None else f"{100 * row[k]:.2f}") for k in ("class_average", "best", "worst")])
    console.print(t)
