"""Scoring a randomized defence the way the field does (Croce et al., ICML 2022; METHOD.md "Scoring a randomized
defence"): every candidate point of an image (the clean image, each attack's point) is classified repeatedly under
fresh noise; per image the candidate with the lowest mean correctness is selected; the selected points are scored
on draws independent of the selection draws (no winner's curse), reported as mean ± std over draws, majority vote
and all draws.

A candidate's classifications are the rows of a bool tensor ``bits`` of shape (D, n):

- D = 1: scored once, for a deterministic model or ``protocol="single-draw"``; that one draw both selects and
  scores, so the worst case is the AND over candidates (igd's scoring before repeated draws);
- D = 2R: rows 0..R-1 are the final draws — each image's queries 0..R-1 on the scoring stream
  (:func:`score_stream`; draw 0 is the draw the single-draw protocol uses) — and rows R..2R-1 the selection draws
  (queries R..2R-1), independent of them.

The draws are keyed by the image (its position and clean content), the stream and the query's ordinal
(:mod:`igd_cli.noise`), not by the point: every candidate of an image is classified under the same R + R noise
draws (common random numbers), whatever batch, shard or device it is scored in.

``protocol="draws-margin"`` (beyond Croce et al.) is the same draws with one change to the selection: candidates
correct in equally many selection draws (at least one) are told apart by their mean margin over those draws
(:func:`selection_margins`), not by which was scored first. With several candidates near the boundary, 5 coin
tosses each often tie, and the first scored — the clean image — wins; the margin keeps the most adversarial one.

Example::

    keys = noise.image_keys(index, x_clean)
    bits = [classify(defense, x, y, rows_for(defense, "draws", 5), keys=keys) for x in (x_clean, x_adv)]
    worst = Score.of(final_of_selected(bits))      # worst case over {clean, adversarial}
    print(worst.mean, worst.std, worst.majority, worst.all_draws)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Sequence

import torch
import torch.nn as nn

from . import noise
from .attacks.base import is_randomized
from .console import progress
from .devices import module_device
from .errors import IgdError

Protocol = Literal["draws", "draws-margin", "single-draw"]
PROTOCOLS: tuple[str, ...] = ("draws", "draws-margin", "single-draw")
#: classifications per candidate for selection, and as many for the final score (Croce et al. use 5)
DEFAULT_DRAWS = 5


def check_protocol(protocol: str, draws: int, command: str | None = None) -> None:
    """One-line errors for ``--protocol`` and ``--draws``; ``command``: one that scores by counts alone (it takes
    no ``draws-margin``)."""
    if protocol not in PROTOCOLS:
        raise IgdError(f"--protocol {protocol}: expected {', '.join(PROTOCOLS[:-1])} or {PROTOCOLS[-1]}")
    if command is not None and uses_margins(protocol):
        raise IgdError(f"--protocol {protocol}: {command} takes draws or single-draw (the margin tie-break is "
                       "igd defend-eval's, igd attack's and igd pipeline's)")
    if int(draws) < 1:
        raise IgdError(f"--draws {draws}: must be at least 1")


def uses_margins(protocol: str) -> bool:
    """``draws-margin``: the draws protocol whose selection breaks ties on mean correctness by the mean margin."""
    return protocol == "draws-margin"


def rows_for(model: nn.Module, protocol: str = "draws", draws: int = DEFAULT_DRAWS) -> int:
    """D, the classifications per candidate: 1 for a deterministic model or the single-draw protocol, else 2R."""
    check_protocol(protocol, draws)
    if protocol == "single-draw" or not is_randomized(model):
        return 1
    return 2 * int(draws)


Part = Literal["all", "final", "selection"]


def score_stream(seed: int) -> int:
    """The noise stream evaluations score on under the run's ``seed`` (attacks query streams of their own)."""
    return noise.stream(seed, "score")


@torch.no_grad()
def classify(model: nn.Module, x: torch.Tensor, y: torch.Tensor, rows: int, *, seed: int = 0,
             keys: torch.Tensor | None = None, stream: int | None = None, batch_size: int = 256,
             description: str | None = None, precision: str = "fp32", part: Part = "all") -> torch.Tensor:
    """Correctness (rows, n) of ``model`` on the points ``x``: row r is each image's r-th query on the stream
    (default :func:`score_stream` of ``seed``).

    ``keys``: the identities of the images the points belong to (:func:`igd_cli.noise.image_keys` of their
    positions and clean images; default: the points themselves, as images 0..n-1 — right for clean images only).
    A point's draws are then fresh per query and the same in any batch, shard, order or device; a deterministic
    model needs one row. ``description``: show a progress bar (images × draws) under that name. ``precision``:
    the forwards under autocast (:mod:`igd_cli.precision`; clean scoring only, never an attack's set).

    ``part`` (for ``rows`` = 2R > 1): ``"final"`` gives only rows 0..R-1 and ``"selection"`` only rows R..2R-1,
    each (R, n) and bit for bit those rows of ``"all"``: the other half's queries are not made (before the
    selection draws, the images' ordinals are advanced past the final ones with ``skip_noise``; a model without it
    is queried and the answers dropped). A candidate with nothing to be selected against (a clean-only evaluation)
    needs only its final draws.

    Example::

        b = images.get(0, 64)
        bits = classify(defense, b.x, b.y, rows=5, keys=noise.image_keys(b.index, b.x))   # (5, 64) bool
        bits.float().mean(1)                                                                # accuracy per draw
    """
    return _score_rows(model, x, y, rows, seed=seed, keys=keys, stream=stream, batch_size=batch_size,
                       description=description, precision=precision, part=part)[0]


def _score_rows(model: nn.Module, x: torch.Tensor, y: torch.Tensor, rows: int, *, seed: int, keys: torch.Tensor | None,
                stream: int | None, batch_size: int, description: str | None = None, precision: str = "fp32",
                part: Part = "all", margins: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """:func:`classify`'s bits and, with ``margins``, each point's margin (its label's logit minus the largest
    other) summed over the rows made, from the same forwards."""
    from .precision import autocast, memory_format

    if part not in ("all", "final", "selection"):
        raise ValueError(f"part {part!r}: expected all, final or selection")
    half = rows // 2 if rows > 1 and part != "all" else 0
    device = module_device(model)
    keys = (noise.image_keys(None, x) if keys is None else keys).to(device)
    if len(keys) != len(x):
        raise ValueError(f"{len(keys)} image keys for {len(x)} points")
    stream_id = score_stream(seed) if stream is None else int(stream)
    # the bits stay on the model's device until the end: one transfer, not one per batch and draw
    out = torch.empty(rows - half, len(x), dtype=torch.bool, device=device)
    total = torch.zeros(len(x), dtype=torch.float64, device=device) if margins else None
    with progress() as bar, autocast(precision, device):
        task = bar.add_task(description or "scoring", total=(rows - half) * len(x), visible=description is not None)
        for i in range(0, len(x), batch_size):
            xb, yb = memory_format(x[i:i + batch_size].to(device), precision), y[i:i + batch_size].to(device)
            with noise.images(keys[i:i + batch_size], stream_id):
                if part == "selection":
                    _skip_queries(model, xb, half)
                for r in range(rows - half):
                    z = model(xb)
                    out[r, i:i + batch_size] = z.argmax(1) == yb
                    if total is not None:
                        z = z.double()
                        total[i:i + batch_size] += (z.gather(1, yb[:, None])[:, 0] -
                                                    z.scatter(1, yb[:, None], -math.inf).amax(1))
                    bar.advance(task, len(xb))
    return out.cpu(), (None if total is None else total.cpu())


@torch.no_grad()
def selection_margins(model: nn.Module, x: torch.Tensor, y: torch.Tensor, rows: int, *, seed: int = 0,
                      keys: torch.Tensor | None = None, stream: int | None = None,
                      batch_size: int = 256) -> torch.Tensor:
    """Each point's margin (its label's logit minus the largest other) averaged over the selection draws of
    :func:`classify` with the same arguments — the same queries, so the same noise — (n,): the ``draws-margin``
    protocol's tie-break. Made in a pass of its own (R forwards), so the other protocols pay nothing for it."""
    if rows < 2:
        raise ValueError("margins break ties between selection draws: a model scored once has none")
    _, total = _score_rows(model, x, y, rows, seed=seed, keys=keys, stream=stream, batch_size=batch_size,
                           part="selection", margins=True)
    return total / (rows // 2)


def _skip_queries(model: nn.Module, xb: torch.Tensor, queries: int) -> None:
    """Advance the images of ``xb`` past ``queries`` queries of ``model`` (made and dropped if it cannot skip)."""
    if queries <= 0:
        return
    skip = getattr(model, "skip_noise", None)
    if callable(skip):
        skip(xb, queries)
    else:
        for _ in range(queries):
            model(xb)


def final_rows(bits: torch.Tensor) -> torch.Tensor:
    """The draws that score a candidate: (R, n)."""
    return bits if bits.shape[0] == 1 else bits[: bits.shape[0] // 2]


def selection_rows(bits: torch.Tensor) -> torch.Tensor:
    """The draws that select a candidate: (R, n), independent of :func:`final_rows` when R > 1 draws are made."""
    return bits if bits.shape[0] == 1 else bits[bits.shape[0] // 2:]


def selected(candidates: Sequence[torch.Tensor], margins: Sequence[torch.Tensor] | None = None) -> torch.Tensor:
    """Per image, the index of the candidate with the fewest correct selection draws (ties: the earliest).

    ``margins`` (``draws-margin``; one (n,) tensor per candidate, :func:`selection_margins`): a tie between
    candidates correct in the same number of selection draws, at least one, goes to the lowest mean margin (ties:
    the earliest); among candidates wrong in every selection draw the earliest is kept, so a later one can change
    nothing there (what skipping relies on, :func:`alive`)."""
    _check_rows(candidates)
    counts = torch.stack([selection_rows(b).sum(0) for b in candidates])  # (K, n)
    if margins is None:
        return counts.argmin(0)  # torch.argmin returns the first minimal index
    if len(margins) != len(candidates) or any(m.shape != counts[0].shape for m in margins):
        raise ValueError("one margin per image for every candidate")
    best = torch.zeros_like(counts[0])
    count, margin = counts[0].clone(), margins[0].clone()
    for k in range(1, len(candidates)):
        better = (counts[k] < count) | ((counts[k] == count) & (count > 0) & (margins[k] < margin))
        best[better] = k
        count, margin = torch.where(better, counts[k], count), torch.where(better, margins[k], margin)
    return best


def final_of_selected(candidates: Sequence[torch.Tensor],
                      margins: Sequence[torch.Tensor] | None = None) -> torch.Tensor:
    """The final draws (R, n) of every image's selected candidate: the worst case's per-image, per-draw bits
    (``margins``: see :func:`selected`)."""
    idx = selected(candidates, margins)
    finals = torch.stack([final_rows(b) for b in candidates])  # (K, R, n)
    return finals.gather(0, idx.view(1, 1, -1).expand(1, finals.shape[1], -1))[0]


def alive(candidates: Sequence[torch.Tensor]) -> torch.Tensor:
    """Images no candidate is wrong on in every selection draw: only there can a later candidate be selected
    (a later one that is also always wrong loses the tie), so skipping the others changes no selection."""
    _check_rows(candidates)
    out = torch.ones(candidates[0].shape[1], dtype=torch.bool)
    for b in candidates:
        out &= selection_rows(b).any(0)
    return out


def _check_rows(candidates: Sequence[torch.Tensor]) -> None:
    if not candidates:
        raise ValueError("no candidates")
    shapes = {tuple(b.shape) for b in candidates}
    if len(shapes) != 1:
        raise ValueError(f"candidates scored with different numbers of draws or images: {sorted(shapes)}")


@dataclass(frozen=True)
class Score:
    """The figures of per-image, per-draw correctness (R, n): accuracy in each draw, their mean ± std (sample
    standard deviation over draws, 0 for one draw), majority vote and all draws (the pessimistic bound).

    Example::

        s = Score.of(torch.tensor([[True, True], [True, False]]))   # 2 draws of 2 images
        s.mean, s.std, s.majority, s.all_draws                       # 0.75, 0.354, 0.5, 0.5
    """

    per_draw: tuple[int, ...]  # correct images in each final draw
    n: int
    majority_count: int  # images correct in more than half the draws
    all_count: int  # images correct in every draw

    @classmethod
    def of(cls, final: torch.Tensor) -> "Score":
        r, n = final.shape
        per_image = final.sum(0)
        return cls(tuple(int(c) for c in final.sum(1)), int(n), int((2 * per_image > r).sum()),
                   int((per_image == r).sum()))

    @property
    def draws(self) -> int:
        return len(self.per_draw)

    @property
    def mean(self) -> float:
        return sum(self.per_draw) / (self.draws * self.n) if self.n else 0.0

    @property
    def std(self) -> float:
        if self.draws < 2 or not self.n:
            return 0.0
        accs = [c / self.n for c in self.per_draw]
        m = sum(accs) / len(accs)
        return math.sqrt(sum((a - m) ** 2 for a in accs) / (len(accs) - 1))

    @property
    def majority(self) -> float:
        return self.majority_count / self.n if self.n else 0.0

    @property
    def all_draws(self) -> float:
        return self.all_count / self.n if self.n else 0.0

    @classmethod
    def merged(cls, parts: Sequence["Score"]) -> "Score":
        """The score of the union of disjoint image sets scored with the same draws (shards)."""
        draws = {p.draws for p in parts}
        if len(draws) != 1:
            raise ValueError("parts scored with different numbers of draws")
        return cls(tuple(sum(c) for c in zip(*(p.per_draw for p in parts))), sum(p.n for p in parts),
                   sum(p.majority_count for p in parts), sum(p.all_count for p in parts))

    def to_json(self) -> dict:
        return {"mean": self.mean, "std": self.std, "majority": self.majority, "all_draws": self.all_draws,
                "draws": self.draws, "per_draw": list(self.per_draw), "n": self.n,
                "majority_count": self.majority_count, "all_count": self.all_count}

    @classmethod
    def from_json(cls, d: dict) -> "Score":
        return cls(tuple(int(c) for c in d["per_draw"]), int(d["n"]), int(d["majority_count"]), int(d["all_count"]))


def score_set(model: nn.Module, x_clean: torch.Tensor, x_adv: torch.Tensor, y: torch.Tensor,
              index: torch.Tensor | None = None, *, protocol: str = "draws", draws: int = DEFAULT_DRAWS,
              seed: int = 0, batch_size: int = 256) -> tuple[Score, Score]:
    """Clean accuracy and the robust accuracy of one attack's set under the protocol (per image the worse of
    {clean, adversarial}), as ``igd attack`` reports them; ``index``: the images' positions in the split."""
    rows = rows_for(model, protocol, draws)
    keys = noise.image_keys(index, x_clean)
    clean, adv = (classify(model, x, y, rows, seed=seed, keys=keys, batch_size=batch_size)
                  for x in (x_clean, x_adv))
    margins = None
    if uses_margins(protocol) and rows > 1:
        margins = [selection_margins(model, x, y, rows, seed=seed, keys=keys, batch_size=batch_size)
                   for x in (x_clean, x_adv)]
    return Score.of(final_rows(clean)), Score.of(final_of_selected([clean, adv], margins))
