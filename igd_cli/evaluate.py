"""Evaluation of the defended and base models under attack: one attack, ready-made adversarial sets, or the
paper's image-wise worst case (IW-WC) over nine attacks (METHOD.md "Evaluation"; Appendix B.3, Table 8).

IW-WC: three attacks on the defended model (AutoAttack, RayS, APGD-CE+EoT) and six transferred from the base
model (APGD-CE, APGD-CW, targeted APGD-DLR, AutoAttack, RayS, APGD-CE+EoT; computed once on the base model on
every image and reused by every defence). An image is robust only if it is classified correctly clean and
under every attack. The transfer sets are evaluated first (a forward pass each), then, with ``skip=True``,
each attack on the defended model runs only on the images no earlier attack broke; such a column is marked
"measured on survivors" (a lower bound of that attack's own accuracy) while the worst case is unchanged.

Every attack's set is written to ``workdir`` as an ``adversarial`` artifact as soon as it is done and reused
when its metadata match, so an interrupted run resumes from the attacks it finished. Randomized defences are
evaluated after ``reseed(seed)`` so reruns agree; attacks query them on a separate noise stream
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

import torch
import torch.nn as nn

from .artifacts import file_sha256, load_artifact, read_metadata, save_artifact
from .attacks import ATTACKS, make_attack, predict, reseed, run_attack
from .attacks.base import AttackResult, is_randomized
from .common import Target, check_classes
from .data import ImageSet
from .errors import IgdError

#: the attacks IW-WC runs on the defended model, in the paper's column order
DIRECT = ("aa", "rays", "apgd-eot")
#: the attacks IW-WC computes on the base model and transfers, in the paper's column order
TRANSFER = ("apgd-ce", "apgd-cw", "apgd-t-dlr", "aa", "rays", "apgd-eot")
#: the order the direct attacks run in with skipping (cheapest per broken image first)
DIRECT_RUN_ORDER = ("aa", "apgd-eot", "rays")

LABELS = {"aa": "AA", "aa-rand": "AA-rand", "rays": "RayS", "apgd-eot": "APGD+EoT", "apgd-ce": "APGD-CE",
          "apgd-cw": "APGD-CW", "apgd-t-dlr": "APGD-tgt-DLR", "square": "Square", "pgd": "PGD", "fgsm": "FGSM"}
#: tolerance when checking that a loaded set lies in the ε-ball (float32 rounding of x ± ε)
BALL_TOL = 1e-5


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
                 "seed": attack_info.get("seed", 0), "data": {"dataset": data.name, "split": data.split,
                                                              "n": len(data)},
                 "robust_accuracy": robust_accuracy})
    meta.update(extra or {})
    return meta


def save_adversarial(path: str | Path, result: AttackResult, meta: dict[str, Any]) -> Path:
    """Write an adversarial set atomically (tensors ``x_adv``, ``y``, ``index``)."""
    return save_artifact(path, "adversarial", {"x_adv": result.x_adv.float().contiguous(), "y": result.y.long(),
                                               "index": result.index.long()}, meta)


@torch.no_grad()
def correct_on(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, seed: int = 0,
               batch_size: int = 256) -> torch.Tensor:
    """Per-image correctness of ``model`` on ``x``; randomized models are reseeded first so reruns agree."""
    reseed(model, seed)
    return predict(model, x, batch_size) == y.cpu()


def load_set(path: str | Path, data: ImageSet, *, eps: float | None = None) -> AttackResult:
    """Load an adversarial set and check it against ``data``: labels, positions, [0, 1] and the ε-ball."""
    art = load_artifact(path, kind="adversarial")
    x_adv, y, index = art["x_adv"].float(), art["y"].long(), art["index"].long()
    n = len(index)
    if x_adv.shape[0] != n or y.shape[0] != n or y.ndim != 1:
        raise IgdError(f"{path}: x_adv, y and index disagree in length")
    d = art.meta.get("data") or {}
    if d.get("dataset") not in (None, data.name) or d.get("split") not in (None, data.split):
        raise IgdError(f"{path}: made on {d.get('dataset')} ({d.get('split')}), not on {data.name} ({data.split})")
    keep = index < len(data)
    x_adv, y, index = x_adv[keep], y[keep], index[keep]
    if len(index) == 0:
        raise IgdError(f"{path}: holds no image among the first {len(data)}")
    x, y_true = _clean(data, index)
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


def _clean(data: ImageSet, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    from .attacks.base import _gather

    return _gather(data, index)


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
    """Per-image correctness of the base and defended models, per column; accuracies are over all n images."""

    y: torch.Tensor
    index: torch.Tensor
    classes: list[str]
    clean_base: torch.Tensor
    clean_defended: torch.Tensor | None
    base: dict[str, torch.Tensor] = field(default_factory=dict)
    defended: dict[str, torch.Tensor] = field(default_factory=dict)
    #: column -> number of images attacked, for defended columns measured only on earlier survivors
    survivors_only: dict[str, int] = field(default_factory=dict)
    sets: dict[str, str] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    eps: float = 0.0
    seed: int = 0
    mode: str = "none"

    @property
    def n(self) -> int:
        return len(self.y)

    def columns(self) -> list[str]:
        keys = list(dict.fromkeys(list(self.defended) + list(self.base)))
        order = [*DIRECT, *[column_key(a, True) for a in TRANSFER]]
        return sorted(keys, key=lambda k: (order.index(k) if k in order else len(order), k))

    def worst(self, defended: bool = True) -> torch.Tensor | None:
        """Per-image robustness under every column (and clean), or None without any attack column."""
        cols = self.defended if defended else self.base
        clean = self.clean_defended if defended else self.clean_base
        if not cols or clean is None:
            return None
        out = clean.clone()
        for c in cols.values():
            out &= c
        return out

    def to_json(self, per_image: bool = False) -> dict[str, Any]:
        has_def = self.clean_defended is not None
        clean = self.clean_defended if has_def else self.clean_base
        robust = self.defended if has_def else self.base
        worst = self.worst(has_def)
        base_worst = self.worst(False)
        out: dict[str, Any] = {
            "n_examples": self.n,
            "defended": has_def,
            "clean_accuracy": _acc(clean),
            "base_clean_accuracy": _acc(self.clean_base),
            "robust_accuracy": {k: _acc(v) for k, v in robust.items()},
            "base_robust_accuracy": {k: _acc(v) for k, v in self.base.items()},
            "worst_case": None if worst is None else _acc(worst),
            "base_worst_case": None if base_worst is None else _acc(base_worst),
            "measured_on_survivors": dict(self.survivors_only),
            "per_class": self.per_class(),
            "eps": self.eps,
            "seed": self.seed,
            "mode": self.mode,
            "sets": dict(self.sets),
            "seconds": {k: round(v, 3) for k, v in self.seconds.items()},
        }
        if per_image:
            names, mat = self.correct_matrix()
            out["per_image"] = {"index": self.index.tolist(), "columns": names, "correct": mat.int().tolist()}
        return out

    def correct_matrix(self) -> tuple[list[str], torch.Tensor]:
        """(names, bool matrix columns × images): clean, each column and worst case, base then defended."""
        names, rows = [], []
        for side, clean, cols in (("base", self.clean_base, self.base),
                                  ("defended", self.clean_defended, self.defended)):
            if clean is None:
                continue
            worst = self.worst(side == "defended")
            for k, v in [("clean", clean), *cols.items(), *([("worst_case", worst)] if worst is not None else [])]:
                names.append(f"{side}:{k}")
                rows.append(v)
        return names, torch.stack(rows)

    def per_class(self) -> dict[str, Any]:
        """Per-class accuracies of every row of :meth:`correct_matrix` (the paper's Table 11), with the
        class-wise average, best and worst class."""
        names, mat = self.correct_matrix()
        out: dict[str, Any] = {"classes": list(self.classes), "rows": {}}
        for name, row in zip(names, mat):
            accs = []
            for c in range(len(self.classes)):
                sel = self.y == c
                accs.append(_acc(row[sel]) if bool(sel.any()) else None)
            present = [a for a in accs if a is not None]
            out["rows"][name] = {"accuracy": accs,
                                 "class_average": sum(present) / len(present) if present else None,
                                 "best": max(present) if present else None,
                                 "worst": min(present) if present else None}
        return out

    def save(self, path: str | Path, meta: dict[str, Any] | None = None) -> Path:
        """Write the per-image correctness as an ``eval-report`` artifact (tensor ``correct``, columns × images)."""
        names, mat = self.correct_matrix()
        full = dict(meta or {})
        full.update({"columns": names, "result": self.to_json()})
        return save_artifact(path, "eval-report", {"correct": mat.to(torch.uint8), "y": self.y, "index": self.index},
                             full)


def _acc(t: torch.Tensor) -> float:
    """Fraction correct as count / n in double precision (a float32 mean prints 0.5550000071525574)."""
    return int(t.sum()) / t.numel() if t.numel() else 0.0


# --- the evaluator ---------------------------------------------------------------------------------------

class Evaluator:
    """Runs or reuses attack sets and evaluates them on the base and defended models (see module doc)."""

    def __init__(self, target: Target, defense: nn.Module | None, data: ImageSet, *, eps: float | None = None,
                 norm: str = "Linf", budgets: Budgets | None = None, seed: int = 0, batch_size: int = 128,
                 workdir: str | Path | None = None, defense_meta: dict[str, Any] | None = None,
                 adv_files: Sequence[str | Path] = (), show_progress: bool = True,
                 on_set: Callable[[str, str, AttackResult], None] | None = None,
                 positions: torch.Tensor | None = None):
        self.target, self.defense, self.data = target, defense, data
        self.eps = float(eps if eps is not None else target.default_eps())
        self.norm, self.seed, self.batch_size = norm, int(seed), batch_size
        self.budgets = budgets or Budgets()
        self.workdir = Path(workdir) if workdir is not None else None
        self.defense_meta = dict(defense_meta or {})
        self.show_progress = show_progress
        self.on_set = on_set
        if positions is None:
            self.positions = torch.arange(len(data), dtype=torch.int64)
            self.y = data.labels().clone() if hasattr(data, "labels") else _clean(data, self.positions)[1]
        else:  # a subset (an evaluation shard): columns are aligned with these absolute positions
            self.positions = torch.as_tensor(positions, dtype=torch.int64).flatten().clone()
            if len(self.positions) == 0 or int(self.positions.min()) < 0 or int(self.positions.max()) >= len(data):
                raise IgdError(f"image positions must lie in 0..{len(data) - 1}")
            if len(torch.unique(self.positions)) != len(self.positions):
                raise IgdError("image positions must be distinct")
            self.y = _clean(data, self.positions)[1]
        #: absolute position -> row of the columns (-1: not evaluated)
        self.row_of = torch.full((len(data),), -1, dtype=torch.int64)
        self.row_of[self.positions] = torch.arange(len(self.positions))
        self.given = self._load_given(adv_files)

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
               "seed": self.seed, "dataset": self.data.name, "split": self.data.split}
        if kind == "defended":
            key["defense"] = self.defense_meta
        return json.loads(json.dumps(key, sort_keys=True, default=str))  # as it reads back from metadata

    def _path(self, key: dict[str, Any]) -> Path | None:
        if self.workdir is None:
            return None
        digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:12]
        return self.workdir / f"{key['target']}-{key['attack']}-{digest}.safetensors"

    def _model(self, kind: str) -> nn.Module:
        return self.defense if kind == "defended" else self.target.model

    def obtain(self, attack: str, kind: str, positions: torch.Tensor) -> tuple[AttackResult, str]:
        """The set of ``attack`` on the ``kind`` model for ``positions``: a given ``--adv`` set, a matching set
        in the workdir, or a new run (saved to the workdir at once)."""
        if (kind, attack) in self.given:
            res, src = self.given[(kind, attack)]
            part = restrict(res, positions)
            if part is None:
                where = (f"the first {len(self.data)} images" if len(self.positions) == len(self.data) else
                         f"images {int(self.positions.min())}..{int(self.positions.max())}")
                raise IgdError(f"{src}: the {attack} set lacks some of {where}")
            return part, src
        model = self._model(kind)
        atk = make_attack(attack, model, eps=self.eps, norm=self.norm, seed=self.seed,
                          device=self.target.device, num_classes=self.target.loaded.num_classes,
                          strict=False, **self.budgets.kwargs())
        info = atk.describe()
        key = self._key_meta(info, kind)
        path = self._path(key)
        if path is not None and path.exists():
            try:
                meta = read_metadata(path)
                if meta.get("kind") == "adversarial" and meta.get("set_key") == key:
                    part = restrict(load_set(path, self.data, eps=self.eps), positions)
                    if part is not None:
                        return part, str(path)
            except IgdError:
                pass  # unreadable or stale: recompute and overwrite
        label = f"{kind} {attack}" + (f" ({len(positions)} survivors)" if len(positions) < len(self.positions) else "")
        res = run_attack(atk, self.data, batch_size=self.batch_size, positions=positions, description=label,
                         show_progress=self.show_progress)
        if self.on_set is not None:
            self.on_set(attack, kind, res)
        if path is not None:
            clean_ok = correct_on(model, _clean(self.data, positions)[0], res.y, seed=self.seed,
                                  batch_size=self.batch_size)
            adv_ok = correct_on(model, res.x_adv, res.y, seed=self.seed, batch_size=self.batch_size)
            meta = set_meta(self.target.provenance(), info, kind, self.data, _acc(clean_ok & adv_ok),
                            {"set_key": key, "seconds": round(res.seconds, 3), "n_attacked": len(positions),
                             "batch_size": self.batch_size, **({"defense": self.defense_meta, "mask_sha256": self.defense_meta.get("mask_sha256")}
                                if kind == "defended" else {})})
            save_adversarial(path, res, meta)
        return res, (str(path) if path is not None else "")

    # -- evaluation ------------------------------------------------------------------------------------
    def clean(self, kind: str) -> torch.Tensor:
        x, y = _clean(self.data, self.positions)
        return correct_on(self._model(kind), x, y, seed=self.seed, batch_size=self.batch_size)

    def column(self, res: AttackResult, kind: str, clean_ok: torch.Tensor) -> torch.Tensor:
        """Per-image correctness over the evaluated positions; images outside the set count as broken."""
        ok = correct_on(self._model(kind), res.x_adv, res.y, seed=self.seed, batch_size=self.batch_size)
        out = torch.zeros(len(self.positions), dtype=torch.bool)
        rows = self.row_of[res.index]
        out[rows[rows >= 0]] = ok[rows >= 0]
        return out & clean_ok


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
                     positions: torch.Tensor | None = None) -> EvalResult:
    """Evaluate ``defense`` (and the base model ``target.model``) on the first ``len(data)`` images.

    ``attack``: ``none`` (clean, plus any ``adv_files``), an attack name (run on the defended model, and on the
    base model for the base column when ``base``), or ``iw-wc`` (the nine attacks; ``adv_files`` are reused
    for the attacks they hold). ``defense=None`` evaluates the base model alone (its IW-WC uses the six base
    sets). ``skip`` runs the IW-WC attacks on the defended model only on images still unbroken.
    ``workdir``: where sets are kept and reused (``"auto"``: :func:`default_workdir`; None: nowhere).
    ``positions``: evaluate only these positions of ``data`` (an evaluation shard; default all); the result's
    ``index`` holds them, and attacks see the same absolute positions (per-image seeds) as in a whole run.
    """
    if workdir == "auto":
        workdir = default_workdir(target)
    if attack not in ("none", "iw-wc") and attack not in ATTACKS:
        raise IgdError(f"--attack {attack}: unknown (choose from none, iw-wc, {', '.join(ATTACKS)})")
    check_classes(target, data)
    ev = Evaluator(target, defense, data, eps=eps, norm=norm, budgets=budgets, seed=seed, batch_size=batch_size,
                   workdir=workdir, defense_meta=defense_meta, adv_files=adv_files, show_progress=show_progress,
                   on_set=on_set, positions=positions)
    t0 = time.perf_counter()
    has_def = defense is not None
    result = EvalResult(ev.y.clone(), ev.positions.clone(), list(data.classes), ev.clean("base"),
                        ev.clean("defended") if has_def else None, eps=ev.eps, seed=ev.seed, mode=attack)
    result.seconds["clean"] = time.perf_counter() - t0
    everything = ev.positions

    def add_base_set(name: str, res: AttackResult, src: str) -> None:
        """A set made on the base model: the base column and, with a defence, the transfer column."""
        key = column_key(name, True) if has_def else name
        result.base[name if not has_def else key] = ev.column(res, "base", result.clean_base)
        if has_def:
            result.defended[key] = ev.column(res, "defended", result.clean_defended)
        result.sets[key] = src

    # ready-made sets first (cheap: a forward pass each)
    for (kind, name), (res, src) in ev.given.items():
        if attack == "iw-wc" and ((kind == "base" and name in TRANSFER) or (kind == "defended" and name in DIRECT)):
            continue  # used below, in their place
        if kind == "base":
            add_base_set(name, res, src)
        else:
            result.defended[name] = ev.column(res, "defended", result.clean_defended)
            result.sets[name] = src

    if attack == "iw-wc":
        for name in TRANSFER:
            t = time.perf_counter()
            res, src = ev.obtain(name, "base", everything)
            add_base_set(name, res, src)
            if has_def and name in DIRECT:  # Table 8: the base row's direct columns are its own attacks
                result.base[name] = result.base[column_key(name, True)]
            result.seconds[column_key(name, has_def)] = time.perf_counter() - t
        if has_def:
            for name in DIRECT_RUN_ORDER:
                t = time.perf_counter()
                alive = result.worst(True) if skip else result.clean_defended
                todo = everything[alive] if skip else everything
                if len(todo) == 0:
                    result.defended[name] = torch.zeros(len(everything), dtype=torch.bool)
                    result.survivors_only[name] = 0
                    continue
                res, src = ev.obtain(name, "defended", todo)
                result.defended[name] = ev.column(res, "defended", result.clean_defended)
                if skip and len(todo) < len(everything):
                    result.survivors_only[name] = len(todo)
                result.sets[name] = src
                result.seconds[name] = time.perf_counter() - t
    elif attack != "none":
        t = time.perf_counter()
        if has_def:
            res, src = ev.obtain(attack, "defended", everything)
            result.defended[attack] = ev.column(res, "defended", result.clean_defended)
            result.sets[attack] = src
            result.seconds[attack] = time.perf_counter() - t
        if base or not has_def:
            t = time.perf_counter()
            res, src = ev.obtain(attack, "base", everything)
            result.base[attack] = ev.column(res, "base", result.clean_base)
            result.sets.setdefault(attack if not has_def else f"base:{attack}", src)
            result.seconds[f"base:{attack}"] = time.perf_counter() - t
    result.seconds["total"] = time.perf_counter() - t0
    return result


def defense_identity(mask_path: str | Path, defense: nn.Module | None = None,
                     settings: dict[str, Any] | None = None) -> dict[str, Any]:
    """What identifies a defended model in set metadata: the mask file's sha256 and the defence settings."""
    meta = read_metadata(mask_path)
    out: dict[str, Any] = {"mask": str(mask_path), "mask_sha256": file_sha256(mask_path),
                           "layer": meta.get("layer"), "k": meta.get("k")}
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


# --- rendering ----------------------------------------------------------------------------------------

def render_table(result: EvalResult | dict[str, Any], console=None, title: str | None = None) -> None:
    """The paper's Table 8 for one defence, transposed to fit a terminal: rows clean, each attack and IW-WC,
    columns base model, + IG-Defense and the gain (accuracies in %); rows measured on survivors carry a dagger."""
    from rich.table import Table

    from .console import out_console

    console = console or out_console
    r = result.to_json() if isinstance(result, EvalResult) else result
    has_def = bool(r.get("defended"))
    keys = list(dict.fromkeys(list(r["robust_accuracy"]) + list(r["base_robust_accuracy"])))
    order = [*DIRECT, *[column_key(a, True) for a in TRANSFER]]
    keys.sort(key=lambda k: (order.index(k) if k in order else len(order), k))
    surv = r.get("measured_on_survivors", {})
    t = Table(title=title or f"robust accuracy (%), {r['n_examples']} images, ε={r.get('eps', 0):.4g}")
    t.add_column("attack")
    t.add_column("base model", justify="right")
    if has_def:
        t.add_column("+ IG-Defense", justify="right")
        t.add_column("gain", justify="right")

    def fmt(v: float | None) -> str:
        return "—" if v is None else f"{100 * v:.2f}"

    def row(name: str, b: float | None, d: float | None) -> None:
        if not has_def:
            t.add_row(name, fmt(b))
            return
        gain = "" if b is None or d is None else f"{100 * (d - b):+.2f}"
        t.add_row(name, fmt(b), fmt(d), gain)

    row("Clean", r["base_clean_accuracy"], r["clean_accuracy"])
    for k in keys:
        row(column_label(k) + ("†" if k in surv else ""), r["base_robust_accuracy"].get(k),
            r["robust_accuracy"].get(k) if has_def else None)
    worst_name = "IW-WC" if r.get("mode") == "iw-wc" else "worst case"
    row(worst_name, r.get("base_worst_case"), r.get("worst_case") if has_def else None)
    console.print(t)
    if surv:
        console.print("† measured only on the images that survived the attacks run before it "
                      f"({', '.join(f'{column_label(k)}: {v}' for k, v in surv.items())} images attacked): a lower "
                      "bound of that attack's own accuracy; the worst case is exact.")


def render_per_class(result: EvalResult | dict[str, Any], console=None) -> None:
    """Class-wise average, best and worst class (the paper's Table 11) for every row."""
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
