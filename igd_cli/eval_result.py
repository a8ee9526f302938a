"""The result of an evaluation: IW-WC's columns (which attacks, in which order, their labels) and
:class:`EvalResult`, the per-image, per-draw correctness of every candidate and the figures the scoring protocol
derives from it (:mod:`igd_cli.scoring`), with its eval-report artifact."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from .artifacts import save_artifact
from .errors import IgdError
from .scoring import Score, alive, final_of_selected, final_rows, uses_margins

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
#: the same mark for a defence other than IG-Defense (a ``--defense``): the adaptive attack through its capabilities
BEYOND_NOTE_GENERIC = ("‡ beyond the paper: the adaptive attack through the defence's contract (APGD + EoT on its "
                       "first_pass when it has one, then APGD + EoT and PGD + EoT on its surrogate, BPDA, or on the "
                       "defence itself; docs/own-defense.md)")


def column_key(attack: str, transfer: bool) -> str:
    """JSON key of a column: ``tr-NAME`` for a set made on the base model and evaluated on the defence."""
    return f"tr-{attack}" if transfer else attack


def column_label(key: str) -> str:
    if key.startswith("tr-"):
        return "Tr-" + LABELS.get(key[3:], key[3:])
    return LABELS.get(key, key)


@dataclass
class EvalResult:
    """Per-image, per-draw correctness of every candidate point (the clean image, then each column's point in the
    order they were scored) on the base and the defended model, and the figures the scoring protocol derives:
    per column the worse of {clean, that column} and the worst case over all candidates, each selected on the
    selection draws and scored on the final draws (:mod:`igd_cli.scoring`). Accuracies are over all n images.

    Example::

        res = evaluate_defense(target, defense, data, attack="fgsm", workdir="adv")   # or "iw-wc"
        j = res.to_json()  # worst_case (mean over draws), worst_case_std, worst_case_majority, ...
        res.defended["fgsm"]                           # bool (draws, n): each image's correctness in each draw
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
    #: sides ("base", "defended") without columns whose clean bits are the final draws only (R, n): with nothing to
    #: select against, the selection draws are not made; such a side takes no column
    clean_final_only: tuple[str, ...] = ()
    #: defended columns whose gradient attack found no gradient (column -> why): no column, the worst case
    #: rests on the others
    no_gradient: dict[str, str] = field(default_factory=dict)
    #: how tables name the defended model (IG-Defense, or a --defense's callable)
    defense_label: str | None = None
    #: ``draws-margin``: side ("base", "defended") -> candidate ("clean" or a column) -> each image's mean margin
    #: over the selection draws (:func:`igd_cli.scoring.selection_margins`); empty for the other protocols
    margins: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)

    @property
    def n(self) -> int:
        return len(self.y)

    def _side(self, defended: bool) -> tuple[torch.Tensor | None, dict[str, torch.Tensor]]:
        return (self.clean_defended, self.defended) if defended else (self.clean_base, self.base)

    def _clean_final(self, defended: bool) -> torch.Tensor | None:
        """The clean images' final draws (R, n) on one side."""
        clean, cols = self._side(defended)
        if clean is None:
            return None
        if ("defended" if defended else "base") in self.clean_final_only:
            if cols:
                raise ValueError("a side scored without selection draws cannot take columns")
            return clean
        return final_rows(clean)

    def candidates(self, defended: bool = True) -> list[torch.Tensor]:
        """The clean bits, then every column's, in scoring order (selection ties go to the earliest)."""
        clean, cols = self._side(defended)
        return [] if clean is None else [clean, *cols.values()]

    def candidate_margins(self, defended: bool = True, names: Sequence[str] | None = None) -> list[torch.Tensor] | None:
        """The selection margins of the candidates ``names`` (default: clean and every column, the order of
        :meth:`candidates`) under ``draws-margin``, else None (ties go to the earliest)."""
        side = self.margins.get("defended" if defended else "base")
        if not side:
            return None
        names = ["clean", *self._side(defended)[1]] if names is None else names
        missing = [k for k in names if k not in side]
        if missing:
            raise ValueError(f"no selection margins for {', '.join(missing)}")
        return [side[k] for k in names]

    def draws(self, defended: bool = True) -> int:
        """R, the final draws per point (1 for a deterministic model or the single-draw protocol)."""
        final = self._clean_final(defended)
        return 0 if final is None else final.shape[0]

    def worst(self, defended: bool = True) -> torch.Tensor | None:
        """The worst case's final draws (R, n): per image the candidate selected over clean and every column, or
        None without any column."""
        cands = self.candidates(defended)
        return final_of_selected(cands, self.candidate_margins(defended)) if len(cands) > 1 else None

    def worst_paper(self) -> torch.Tensor | None:
        """The defended worst case over clean and the paper's columns only (without :data:`BEYOND_PAPER`)."""
        if self.clean_defended is None:
            return None
        names = [k for k in self.defended if k not in BEYOND_PAPER]
        if not names:
            return None
        return final_of_selected([self.clean_defended, *(self.defended[k] for k in names)],
                                 self.candidate_margins(True, ["clean", *names]))

    def alive(self, defended: bool = True) -> torch.Tensor:
        """Images where a later candidate could still be selected (see :func:`igd_cli.scoring.alive`)."""
        return alive(self.candidates(defended))

    def rows(self, defended: bool = True) -> list[tuple[str, torch.Tensor]]:
        """(name, final draws) of clean, every column (the worse of clean and it) and the worst case."""
        clean, cols = self._side(defended)
        if clean is None:
            return []
        out = [("clean", self._clean_final(defended))]
        out += [(k, final_of_selected([clean, v], self.candidate_margins(defended, ["clean", k])))
                for k, v in cols.items()]
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
            "no_gradient": sorted(self.no_gradient),
            "defense_label": self.defense_label,
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
        for side in ("base", "defended"):
            m = self.candidate_margins(side == "defended") if side in cands else None
            if m is not None:  # draws-margin: the tie-break travels with the bits, so a merge selects alike
                tensors[f"{side}_margins"] = torch.stack(m).double()
        full = dict(meta or {})
        full.update({"columns": names, "candidates": cands, "protocol": self.protocol,
                     "draws": self.draws(self.clean_defended is not None), "result": self.to_json(),
                     "clean_final_only": list(self.clean_final_only)})
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

        def margins(name: str) -> dict[str, torch.Tensor]:
            m = tensors.get(f"{name}_margins")
            if m is None:
                return {}
            if m.shape[0] != len(cands[name]):
                raise IgdError(f"{name}_margins holds {m.shape[0]} candidates, the metadata names {len(cands[name])}")
            return {k: m[i].double() for i, k in enumerate(cands[name])}

        clean_b, base = side("base")
        clean_d, dfd = side("defended")
        ties = {name: margins(name) for name in ("base", "defended") if name in cands and margins(name)}
        protocol = str(meta.get("protocol", r.get("protocol", "draws")))
        for name, clean in (("base", clean_b), ("defended", clean_d)):
            if uses_margins(protocol) and clean is not None and clean.shape[0] > 1 and name not in ties and \
                    name not in (meta.get("clean_final_only") or ()):
                raise IgdError(f"an eval-report scored by {protocol} without the {name} model's selection margins")
        return cls(tensors["y"].long(), tensors["index"].long(), list(meta.get("classes") or []), clean_b, clean_d,
                   base, dfd, dict(r.get("measured_on_survivors") or {}), dict(r.get("sets") or {}),
                   dict(r.get("seconds") or {}), eps=r.get("eps"), seed=int(r.get("seed", 0)),
                   mode=str(r.get("mode", "none")), protocol=protocol,
                   randomized=bool(r.get("randomized", False)),
                   clean_final_only=tuple(meta.get("clean_final_only") or ()),
                   no_gradient={k: "" for k in r.get("no_gradient") or ()}, defense_label=r.get("defense_label"),
                   margins=ties)
