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
when its metadata match, so an interrupted run resumes from the attacks it finished. Every draw of the defence's
noise is keyed by the image, the stream and the query's ordinal (:mod:`igd_cli.noise`), so reruns agree; attacks
query it on streams of their own (:func:`igd_cli.attacks.base.attack_stream`), so the evaluation of a point
never replays the attack's draw.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn as nn

from .adv_sets import (BALL_TOL, PYAUTOATTACK_VERSION, load_set, merge_sets, restrict, save_adversarial,  # noqa: F401
                       set_meta)
from .artifacts import file_sha256, read_metadata
from .attacks import ATTACKS, make_attack, run_attack
from . import contract
from .attacks.adaptive import DEFAULT_BPDA_TEMPERATURE
from .attacks.base import AttackResult, gather
from .common import Target, check_classes
from .data import ImageSet
from . import noise
from .errors import IgdError
from .home import adv_home
from .precision import precision_meta
from .eval_result import (BEYOND_NOTE, BEYOND_PAPER, DIRECT, DIRECT_RUN_ORDER, LABELS, TRANSFER,  # noqa: F401
                          EvalResult, column_key, column_label)
from .eval_table import TableCells, render_per_class, render_table, scoring_note, table_cells  # noqa: F401
from .scoring import (DEFAULT_DRAWS, Score, classify, final_of_selected, final_rows, is_randomized, rows_for,
                      selection_margins, uses_margins)

@dataclass
class Budgets:
    """Budget overrides (None keeps each attack's paper default).

    Example::

        evaluate_defense(target, defense, images, attack="apgd-ce", budgets=Budgets(steps=10, eot_iter=2))
    """

    steps: int | None = None
    restarts: int | None = None
    queries: int | None = None
    eot_iter: int | None = None

    def kwargs(self) -> dict[str, int | None]:
        return {"steps": self.steps, "restarts": self.restarts, "queries": self.queries, "eot_iter": self.eot_iter}


# --- the evaluator ---------------------------------------------------------------------------------------

class Evaluator:
    """Runs or reuses attack sets and scores them on the base and defended models (see module doc)."""

    def __init__(self, target: Target, defense: nn.Module | None, data: ImageSet, *, eps: float | None = None,
                 norm: str = "Linf", budgets: Budgets | None = None, seed: int = 0, batch_size: int = 128,
                 workdir: str | Path | None = None, defense_meta: dict[str, Any] | None = None,
                 adv_files: Sequence[str | Path] = (), show_progress: bool = True,
                 on_set: Callable[[str, str, AttackResult], None] | None = None,
                 positions: torch.Tensor | None = None, protocol: str = "draws", draws: int = DEFAULT_DRAWS,
                 bpda_temperature: float | None = None, precision: str = "fp32"):
        self.target, self.defense, self.data = target, defense, data
        self.precision = precision  # the clean scoring's (attacks and their sets: fp32)
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
        #: the images' identities, which key every noise draw their candidates are scored with
        self.keys = noise.image_keys(self.positions, self.x)
        #: absolute position -> row of the columns (-1: not evaluated)
        self.row_of = torch.full((len(data),), -1, dtype=torch.int64)
        self.row_of[self.positions] = torch.arange(len(self.positions))
        self.given = self._load_given(adv_files)
        self._clean_bits: dict[str, torch.Tensor] = {}
        self._clean_final: dict[str, torch.Tensor] = {}
        self._clean_margins: dict[str, torch.Tensor] = {}

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
                    raise IgdError(f"{f}: a set made on a defended model; give its --mask or --defense")
                want = self.defense_meta.get("mask_sha256")
                if want is not None and meta.get("mask_sha256") != want:
                    raise IgdError(f"{f}: made on a defence with another mask")
                own = self.defense_meta.get("defense_fingerprint")
                if own is not None and (meta.get("defense") or {}).get("defense_fingerprint") != own:
                    raise IgdError(f"{f}: made on another defence than --defense's")
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
               "seed": self.seed, "images": self.data.source_digest(), "pyautoattack": PYAUTOATTACK_VERSION,
               **self.target.identity()}
        if "revision" in attack_info:  # an attack whose algorithm changed: sets of the old one are not reused
            key["revision"] = attack_info["revision"]
        if kind == "defended":  # the mask or the defence's source by content and the settings, not a file's path
            key["defense"] = {k: v for k, v in self.defense_meta.items() if k not in ("mask", "probe", "defense")}
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
        atk = self._attack(attack, kind)
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
            # the set's own score (kept with the set, whose key has neither precision nor protocol): with fp32 clean
            # bits, ties to the first (draws-margin's evaluations share the set and rescore it)
            score = Score.of(final_of_selected([self.clean(kind, "fp32")[:, rows], bits[:, rows]]))
            protocol = "draws" if uses_margins(self.protocol) else self.protocol
            extra = {"set_key": key, "seconds": round(res.seconds, 3), "n_attacked": len(positions),
                     "batch_size": self.batch_size, **score_meta(score, protocol)}
            if kind == "defended":
                extra.update({"defense": self.defense_meta, "mask_sha256": self.defense_meta.get("mask_sha256")})
            save_adversarial(path, res, set_meta(self.target.provenance(), info, kind, self.data, score.mean, extra))
        return res, (str(path) if path is not None else ""), bits

    def _attack(self, attack: str, kind: str):
        return make_attack(attack, self._model(kind), eps=self.eps, norm=self.norm, seed=self.seed,
                           device=self.target.device, num_classes=self.target.loaded.num_classes,
                           strict=False, **self.budgets.kwargs(), bpda_temperature=self.bpda_temperature)

    def no_gradient(self, attack: str, kind: str) -> str | None:
        """Why ``attack`` cannot run on the ``kind`` model (a gradient attack on a model without a gradient,
        :class:`igd_cli.contract.NoGradient`), or None: known before any image is attacked, so every shard
        agrees on the columns."""
        if (kind, attack) in self.given:
            return None
        try:
            self._attack(attack, kind).check_gradient(self.x[:2].to(self.target.device))
        except contract.NoGradient as exc:
            return str(exc)
        return None

    # -- scoring ---------------------------------------------------------------------------------------
    def clean(self, kind: str, precision: str | None = None) -> torch.Tensor:
        """The clean images' bits (D, n) on the ``kind`` model in ``precision`` (default: the evaluation's),
        computed once (the selection draws only, where :meth:`clean_final` already made the final ones)."""
        precision = precision or self.precision
        key = kind if precision == self.precision else f"{kind}:{precision}"
        if key not in self._clean_bits:
            kw = dict(seed=self.seed, keys=self.keys, batch_size=self.batch_size, precision=precision)
            if key in self._clean_final and self.rows[kind] == 1:  # one row both selects and scores
                self._clean_bits[key] = self._clean_final[key]
            elif key in self._clean_final:
                sel = classify(self._model(kind), self.x, self.y, self.rows[kind], part="selection",
                               description=self._label(kind, "clean, selection"), **kw)
                self._clean_bits[key] = torch.cat([self._clean_final[key], sel])
            else:
                self._clean_bits[key] = classify(self._model(kind), self.x, self.y, self.rows[kind],
                                                 description=self._label(kind, "clean"), **kw)
        return self._clean_bits[key]

    def clean_final(self, kind: str) -> torch.Tensor:
        """The clean images' final draws (R, n) on the ``kind`` model in the evaluation's precision,
        ``final_rows(clean(kind))``: without a
        candidate to select against, the R selection draws are not made (R classifications per image, not 2R)."""
        if kind in self._clean_bits:
            return final_rows(self._clean_bits[kind])
        if kind not in self._clean_final:
            self._clean_final[kind] = classify(self._model(kind), self.x, self.y, self.rows[kind], seed=self.seed,
                                               keys=self.keys, part="final", batch_size=self.batch_size,
                                               precision=self.precision, description=self._label(kind, "clean"))
        return self._clean_final[kind]

    def _label(self, kind: str, what: str) -> str | None:
        """The progress-bar name of a scoring pass (None: no bar)."""
        if not self.show_progress:
            return None
        r = self.rows[kind]
        return f"scoring {kind} {what}" + (f" ({r // 2} + {r // 2} draws)" if r > 1 else "")

    def column(self, res: AttackResult, kind: str) -> torch.Tensor:
        """The set's bits (D, n) over the evaluated positions on the ``kind`` model; an image outside the set
        counts as wrong in every draw (so a column measured on survivors is a lower bound)."""
        rows = self.row_of[res.index]
        held = rows >= 0
        bits = classify(self._model(kind), res.x_adv[held], res.y[held], self.rows[kind], seed=self.seed,
                        keys=self.keys[rows[held]], batch_size=self.batch_size,
                        description=self._label(kind, str(res.info.get("attack", "set"))))
        out = torch.zeros(self.rows[kind], len(self.positions), dtype=torch.bool)
        out[:, rows[held]] = bits
        return out

    def wants_margins(self, kind: str) -> bool:
        """``draws-margin`` on a model scored by repeated draws: its candidates carry selection margins."""
        return uses_margins(self.protocol) and self.rows[kind] > 1

    def clean_margins(self, kind: str) -> torch.Tensor | None:
        """The clean images' selection margins (n,) on the ``kind`` model under ``draws-margin``, else None."""
        if not self.wants_margins(kind):
            return None
        if kind not in self._clean_margins:
            self._clean_margins[kind] = selection_margins(self._model(kind), self.x, self.y, self.rows[kind],
                                                          seed=self.seed, keys=self.keys, batch_size=self.batch_size)
        return self._clean_margins[kind]

    def column_margins(self, res: AttackResult, kind: str) -> torch.Tensor | None:
        """The set's selection margins (n,) over the evaluated positions under ``draws-margin`` (an image outside
        the set: 0, never read, as it is wrong in every draw), else None."""
        if not self.wants_margins(kind):
            return None
        rows = self.row_of[res.index]
        held = rows >= 0
        out = torch.zeros(len(self.positions), dtype=torch.float64)
        out[rows[held]] = selection_margins(self._model(kind), res.x_adv[held], res.y[held], self.rows[kind],
                                            seed=self.seed, keys=self.keys[rows[held]], batch_size=self.batch_size)
        return out


def score_meta(score: Score, protocol: str) -> dict[str, Any]:
    """The metadata of a set's robust accuracy under the protocol (``igd merge`` sums ``score`` over shards)."""
    return {"robust_accuracy_std": score.std, "score": score.to_json(),
            "scoring": {"protocol": protocol, "draws": score.draws}}


def default_workdir(target: Target) -> Path:
    """Where IW-WC keeps its sets by default: ``$IGD_HOME/adv/<model fingerprint>``."""
    return adv_home() / target.loaded.fingerprint


def evaluate_defense(target: Target, defense: nn.Module | None, data: ImageSet, *, attack: str = "none",
                     adv_files: Sequence[str | Path] = (), workdir: str | Path | None = "auto",
                     budgets: Budgets | None = None, eps: float | None = None, norm: str = "Linf", seed: int = 0,
                     batch_size: int = 128, skip: bool = True, base: bool = True,
                     defense_meta: dict[str, Any] | None = None, show_progress: bool = True,
                     on_set: Callable[[str, str, AttackResult], None] | None = None,
                     positions: torch.Tensor | None = None, protocol: str = "draws",
                     draws: int = DEFAULT_DRAWS, bpda_temperature: float | None = None,
                     precision: str = "fp32") -> EvalResult:
    """Evaluate ``defense`` (and the base model ``target.model``) on the first ``len(data)`` images.

    ``attack``: ``none`` (clean, plus any ``adv_files``), an attack name (run on the defended model, and on the
    base model for the base column when ``base``), or ``iw-wc`` (the nine attacks; ``adv_files`` are reused
    for the attacks they hold). ``defense=None`` evaluates the base model alone (its IW-WC uses the six base
    sets). ``skip`` runs the IW-WC attacks on the defended model only on images where they can still change the
    worst case. ``protocol``/``draws``: how a randomized model is scored (:mod:`igd_cli.scoring`).
    With a defence of the contract (IG-Defense, a ``--defense``; :func:`igd_cli.contract.adaptive_column`), IW-WC
    adds the columns :data:`BEYOND_PAPER` (the adaptive attack, BPDA temperature ``bpda_temperature``) after the
    nine; ``iw_wc_paper`` in the JSON is the worst case without them. A gradient attack on a defended model
    without a gradient (:class:`igd_cli.contract.NoGradient`) leaves no column: it is listed in ``no_gradient``
    and the worst case rests on the others.
    ``workdir``: where sets are kept and reused (``"auto"``: :func:`default_workdir`; None: nowhere).
    ``positions``: evaluate only these positions of ``data`` (an evaluation shard; default all); the result's
    ``index`` holds them, and attacks see the same absolute positions (per-image seeds) as in a whole run.
    ``precision``: the clean scoring under autocast (:mod:`igd_cli.precision`); attacks and the scoring of their
    sets run in fp32.

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
    if defense is not None and defense_meta is None and workdir is not None:
        defense_meta = identity_of(defense)  # sets of another defence in the same workdir are not this one's
    ev = Evaluator(target, defense, data, eps=eps, norm=norm, budgets=budgets, seed=seed, batch_size=batch_size,
                   workdir=workdir, defense_meta=defense_meta, adv_files=adv_files, show_progress=show_progress,
                   on_set=on_set, positions=positions, protocol=protocol, draws=draws,
                   bpda_temperature=bpda_temperature, precision=precision)
    t0 = time.perf_counter()
    has_def = defense is not None
    # a side with no column to select against (clean accuracy alone) needs the clean images' final draws only
    base_cols = attack == "iw-wc" or any(kind == "base" for kind, _ in ev.given) or \
        (attack != "none" and (base or not has_def))
    def_cols = has_def and (attack != "none" or bool(ev.given))

    def clean_bits(kind: str, cols: bool) -> torch.Tensor:
        return ev.clean(kind) if cols else ev.clean_final(kind)

    result = EvalResult(ev.y.clone(), ev.positions.clone(), list(data.classes), clean_bits("base", base_cols),
                        clean_bits("defended", def_cols) if has_def else None, eps=ev.eps, seed=ev.seed,
                        mode=attack, protocol=protocol, randomized=has_def and is_randomized(defense),
                        defense_label=contract.label(defense) if has_def else None,
                        clean_final_only=tuple(side for side, cols in (("base", base_cols), ("defended", def_cols))
                                               if not cols))
    for kind, cols in (("base", base_cols), ("defended", def_cols)):
        m = ev.clean_margins(kind) if cols else None
        if m is not None:  # draws-margin: every candidate's selection margins beside its bits
            result.margins[kind] = {"clean": m}
    result.seconds["clean"] = time.perf_counter() - t0
    everything = ev.positions

    def put(kind: str, key: str, bits: torch.Tensor, res: AttackResult | None) -> None:
        """A column's bits on the ``kind`` model (and its selection margins under ``draws-margin``)."""
        (result.defended if kind == "defended" else result.base)[key] = bits
        if kind in result.margins:
            result.margins[kind][key] = (ev.column_margins(res, kind) if res is not None else
                                         torch.zeros(bits.shape[1], dtype=torch.float64))

    def add_base_set(name: str, res: AttackResult, src: str, bits: torch.Tensor) -> None:
        """A set made on the base model: the base column and, with a defence, the transfer column."""
        key = column_key(name, True) if has_def else name
        put("base", key, bits, res)
        if has_def:
            put("defended", key, ev.column(res, "defended"), res)
        result.sets[key] = src

    # ready-made sets first (cheap: forward passes)
    for (kind, name), (res, src) in ev.given.items():
        if attack == "iw-wc" and ((kind == "base" and name in TRANSFER) or (kind == "defended" and name in DIRECT)):
            continue  # used below, in their place
        if kind == "base":
            add_base_set(name, res, src, ev.column(res, "base"))
        else:
            put("defended", name, ev.column(res, "defended"), res)
            result.sets[name] = src

    if attack == "iw-wc":
        for name in TRANSFER:
            t = time.perf_counter()
            add_base_set(name, *ev.obtain(name, "base", everything))
            if has_def and name in DIRECT:  # Table 8: the base row's direct columns are its own attacks
                result.base[name] = result.base[column_key(name, True)]
                if "base" in result.margins:
                    result.margins["base"][name] = result.margins["base"][column_key(name, True)]
            result.seconds[column_key(name, has_def)] = time.perf_counter() - t
        if has_def:
            beyond = BEYOND_PAPER if contract.adaptive_column(defense) else ()
            for name in (*DIRECT_RUN_ORDER, *beyond):  # the columns beyond the paper last: the nine are unchanged
                t = time.perf_counter()
                why = ev.no_gradient(name, "defended")
                if why is not None:
                    result.no_gradient[name] = why
                    continue
                todo = everything[result.alive(True)] if skip else everything
                if len(todo) == 0:
                    put("defended", name, torch.zeros_like(result.clean_defended), None)
                    result.survivors_only[name] = 0
                    continue
                res, src, bits = ev.obtain(name, "defended", todo)
                put("defended", name, bits, res)
                if skip and len(todo) < len(everything):
                    result.survivors_only[name] = len(todo)
                result.sets[name] = src
                result.seconds[name] = time.perf_counter() - t
    elif attack != "none":
        t = time.perf_counter()
        if has_def and ev.no_gradient(attack, "defended") is not None:
            result.no_gradient[attack] = ev.no_gradient(attack, "defended")
        elif has_def:
            res, src, bits = ev.obtain(attack, "defended", everything)
            put("defended", attack, bits, res)
            result.sets[attack] = src
            result.seconds[attack] = time.perf_counter() - t
        if base or not has_def:
            t = time.perf_counter()
            res, src, bits = ev.obtain(attack, "base", everything)
            put("base", attack, bits, res)
            result.sets.setdefault(attack if not has_def else f"base:{attack}", src)
            result.seconds[f"base:{attack}"] = time.perf_counter() - t
    result.seconds["total"] = time.perf_counter() - t0
    if (bool(result.base) and not base_cols) or (bool(result.defended) and not def_cols):
        raise AssertionError("a side got columns but only its clean final draws were made")  # pragma: no cover
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


def identity_of(defense: nn.Module, mask_path: str | Path | None = None) -> dict[str, Any]:
    """What identifies a defended model: its mask file (:func:`defense_identity`) for IG-Defense from
    ``--mask``, else what the defence says of itself (a ``--defense``: its source and fingerprint)."""
    if mask_path is not None:
        return defense_identity(mask_path, defense)
    if contract.identity(defense) is not None:
        return contract.identity(defense)
    from .models import fingerprint  # a plain module: by its weights and code, as a model is

    return {"module": type(defense).__name__, "settings": contract.settings(defense),
            "defense_fingerprint": fingerprint(defense)}


def adaptive_temperature(value: float | None) -> float:
    """The adaptive attack's BPDA temperature as used (its default when not given)."""
    return float(DEFAULT_BPDA_TEMPERATURE if value is None else value)


# --- defend-eval as a library call --------------------------------------------------------------------------

def eval_identity(target: Target, ident: dict[str, Any], data: ImageSet, *, attack: str, eps: float | None,
                  norm: str, budgets: Budgets, seed: int, skip: bool, adv: Sequence[str | Path],
                  protocol: str, draws: int, precision: str = "fp32") -> dict[str, Any]:
    """What makes two reports parts of one evaluation (``igd merge`` compares it): model, defence (mask sha256
    and settings), data, attack, ε, budgets, seed, scoring protocol, skipping, the given sets (by their attack
    identity, so shards may be given the matching shards of a set), igd's code and the numerics."""
    sets = []
    for f in adv:
        m = read_metadata(f)
        sets.append({k: m.get(k) for k in ("attack", "target", "eps", "norm", "budget", "seed", "model_fingerprint",
                                           "mask_sha256", "revision", "pyautoattack", "data_id")})
    sets.sort(key=lambda d: json.dumps(d, sort_keys=True, default=str))
    out = {"model_fingerprint": target.loaded.fingerprint, "num_classes": target.loaded.num_classes,
           "mask_sha256": ident.get("mask_sha256"), "layer": ident.get("layer"), "k": ident.get("k"),
           "defense": ident.get("settings"), "data": data.identity(),
           "classes": list(data.classes), "attack": attack, "eps": eps, "norm": norm, "budget": budgets.kwargs(),
           "revisions": attack_revisions(attack), "pyautoattack": PYAUTOATTACK_VERSION,
           "seed": int(seed), "skip": bool(skip), "adv": sets, "protocol": protocol, "draws": int(draws),
           **precision_meta(precision), **target.identity()}
    out.update(user_defense_identity(ident))
    return json.loads(json.dumps(out, sort_keys=True, default=str))  # as it reads back from metadata


def user_defense_identity(ident: dict[str, Any]) -> dict[str, Any]:
    """The part of an evaluation's identity a ``--defense`` adds: its callable, source and fingerprint (nothing
    for IG-Defense from a mask, whose identity is the mask's)."""
    if ident.get("defense_fingerprint") is None:
        return {}
    return {"user_defense": {k: ident.get(k) for k in ("callable", "source_sha256", "defense_fingerprint")}}


def attack_revisions(attack: str) -> dict[str, dict[str, int]]:
    """The algorithm revisions of every attack an evaluation runs, with those of the attacks each is built from
    (:meth:`Attack.revisions`; part of its identity: a changed algorithm is another evaluation)."""
    names = set(DIRECT) | set(TRANSFER) | set(BEYOND_PAPER) if attack == "iw-wc" else \
        ({attack} if attack in ATTACKS else set())
    return {name: ATTACKS[name].revisions() for name in sorted(names)}


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


def defend_eval(target: Target, defense: nn.Module, mask_path: str | Path | None, data: ImageSet, *,
                attack: str = "none", adv: Sequence[str | Path] = (), eps: float | None = None, norm: str = "Linf",
                budgets: Budgets | None = None, workdir: str | Path | None = None, skip: bool = True,
                shard: tuple[int, int, int, int] | None = None, seed: int = 0, batch_size: int = 256,
                protocol: str = "draws", draws: int = DEFAULT_DRAWS, report: str | Path | None = None,
                show_progress: bool = True, bpda_temperature: float | None = None, precision: str = "fp32"
                ) -> tuple[EvalResult, dict[str, Any]]:
    """``igd defend-eval`` between parsing and printing: evaluate the defence (IG-Defense from ``mask_path``, or a
    ``--defense`` when ``mask_path`` is None) and the base model, optionally on one shard of the images (``shard`` = (I, N, start, stop), its sets kept apart in
    ``WORKDIR/shard-I-of-N``), write the eval-report ``report`` (with the identity ``igd merge`` checks) and
    return the result with its JSON (CLI.md keys plus the defence, data, budgets and timings)."""
    t0 = time.perf_counter()
    budgets = budgets or Budgets()
    eps = used_eps(target, eps, attack, adv)
    ident = identity_of(defense, mask_path)
    identity = eval_identity(target, ident, data, attack=attack, eps=eps, norm=norm, budgets=budgets, seed=seed,
                             skip=skip, adv=adv, protocol=protocol, draws=draws, precision=precision)
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
                           bpda_temperature=bpda_temperature, precision=precision)
    result = res.to_json()
    result.update({"mask": None if mask_path is None else str(mask_path), "layer": ident.get("layer"),
                   "k": getattr(defense, "k", ident.get("k")), "defense": contract.settings(defense),
                   "defense_spec": ident.get("defense"),
                   "attack": attack, "batch_size": batch_size, "budget": budgets.kwargs(), "skip": skip,
                   "precision": precision,
                   **({"bpda_temperature": identity["bpda_temperature"]} if "bpda_temperature" in identity else {}),
                   "workdir": str(default_workdir(target) if wd == "auto" else wd), **where,
                   "seconds_total": time.perf_counter() - t0, **target.record()})
    if report is not None:
        res.save(report, {**target.provenance(), **ident, "eval_identity": identity, "classes": list(data.classes),
                          "attack": attack, "eps": res.eps, "norm": norm, "budget": budgets.kwargs(), "seed": seed,
                          "skip": skip, "batch_size": batch_size, "n_examples": res.n,
                          "seconds": round(time.perf_counter() - t0, 3), **where})
        result["report"] = str(report)
    return res, result


#: evaluate.py was split along its seams (sets: adv_sets, the result: eval_result, the table: eval_table); their
#: names stay importable from here
__all__ = ["BALL_TOL", "BEYOND_NOTE", "BEYOND_PAPER", "DIRECT", "DIRECT_RUN_ORDER", "LABELS", "PYAUTOATTACK_VERSION",
           "TRANSFER", "Budgets", "EvalResult", "Evaluator", "TableCells", "adaptive_temperature", "attack_revisions",
           "column_key", "column_label", "default_workdir", "defend_eval", "defense_identity", "eval_identity", "identity_of",
           "evaluate_defense", "load_set", "merge_sets", "needs_eps", "render_per_class", "render_table", "restrict",
           "save_adversarial", "score_meta", "scoring_note", "set_meta", "table_cells", "used_eps"]
