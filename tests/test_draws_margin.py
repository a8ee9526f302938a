"""``--protocol draws-margin``: the repeated-draw protocol whose selection breaks ties on mean correctness by the mean
margin over the selection draws. The rule against a reference written here, its effect where it matters (several
candidates near the boundary, closed-form probabilities), margins made on the selection draws' own noise, and the
whole evaluation: skipping, shards and merge give the figures of one plain run; audit and analyze refuse it."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from igd_cli import noise
from igd_cli.artifacts import load_artifact
from igd_cli.scoring import (classify, final_of_selected, rows_for, score_set, selected, selection_margins,
                             selection_rows)
from tests.test_scoring import SIGMA, NoisyLinear

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "defenses"


def _reference_pick(counts: list[list[int]], margins: list[list[float]]) -> list[int]:
    """Per image: fewest correct selection draws; among equal counts of at least one, the lowest margin; else (and
    among equal margins) the earliest candidate. Written out image by image."""
    k, n = len(counts), len(counts[0])
    out = []
    for i in range(n):
        best = 0
        for c in range(1, k):
            if counts[c][i] < counts[best][i]:
                best = c
            elif counts[c][i] == counts[best][i] and counts[c][i] > 0 and margins[c][i] < margins[best][i]:
                best = c
        out.append(best)
    return out


def test_the_tie_break_is_the_rule_written_out():
    g = torch.Generator().manual_seed(1)
    k, r, n = 6, 5, 2000
    bits = [torch.rand(2 * r, n, generator=g) < 0.4 for _ in range(k)]
    margins = [torch.randn(n, generator=g).double() for _ in range(k)]
    margins[3][:50] = margins[1][:50]  # exact ties of margin too: the earliest
    counts = [selection_rows(b).sum(0).tolist() for b in bits]
    want = torch.tensor(_reference_pick(counts, [m.tolist() for m in margins]))
    got = selected(bits, margins)
    assert torch.equal(got, want)
    plain = selected(bits)
    assert (got != plain).sum() > n // 10  # the tie-break decides often at 5 draws
    # an image every candidate gets wrong in every selection draw keeps the first, whatever the margins
    never = [torch.zeros(2 * r, 3, dtype=torch.bool) for _ in range(k)]
    assert selected(never, [torch.arange(3).double() * (-c) for c in range(k)]).tolist() == [0, 0, 0]


@pytest.fixture(scope="module")
def boundary():
    """Per image, a clean point far on the right side, six weak points near the boundary (P(correct) about 0.54)
    and one stronger (about 0.38), last: the draws protocol's ties favour the earlier, weaker ones."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(16, generator=g)
    u = w / w.norm()
    n = 600
    y = torch.ones(n, dtype=torch.int64)

    def at(z: float) -> torch.Tensor:
        return (z * SIGMA * u[None, :] + 0.01 * torch.randn(n, 16, generator=g)).reshape(n, 1, 4, 4)

    points = [at(2.0)] + [at(0.1) for _ in range(6)] + [at(-0.3)]
    p = [torch.tensor([0.5 * (1 + math.erf(float(xi.flatten() @ w) / (SIGMA * float(w.norm())) / math.sqrt(2)))
                       for xi in x]) for x in points]
    return NoisyLinear(w), points, y, torch.stack(p)


def test_the_margin_keeps_the_stronger_point_near_the_boundary(boundary):
    model, points, y, p = boundary
    keys = noise.image_keys(None, points[0])  # every candidate of image i under image i's draws
    rows = rows_for(model, "draws-margin", 5)
    bits = [classify(model, x, y, rows, keys=keys) for x in points]
    margins = [selection_margins(model, x, y, rows, keys=keys) for x in points]
    true_plain = p.gather(0, selected(bits).view(1, -1)).mean()
    true_margin = p.gather(0, selected(bits, margins).view(1, -1)).mean()
    assert true_margin < true_plain - 0.03, (float(true_margin), float(true_plain))
    assert _mean(final_of_selected(bits, margins)) < _mean(final_of_selected(bits)) - 0.02


def _mean(final: torch.Tensor) -> float:
    return float(final.float().mean())


def test_margins_are_made_on_the_selection_draws_own_noise(boundary):
    """The margin's sign in each selection draw is that draw's decision: the same queries, the same noise."""
    model, points, y, _ = boundary
    x = points[1]
    keys = noise.image_keys(None, points[0])
    rows = rows_for(model, "draws-margin", 1)  # one selection draw: its margin is that draw's
    bits = classify(model, x, y, rows, keys=keys)
    m = selection_margins(model, x, y, rows, keys=keys)
    assert torch.equal(m > 0, selection_rows(bits)[0])
    other = selection_margins(model, x, y, rows, keys=keys, batch_size=7)  # another batch: the same draws
    assert torch.equal(other > 0, m > 0) and torch.allclose(other, m, rtol=0, atol=1e-5)


def test_score_set_breaks_ties_by_margin(boundary):
    """igd attack's figure: the worse of {clean, the set} with the margin tie-break, by hand."""
    model, points, y, _ = boundary
    clean, adv = points[1], points[7]
    _, got = score_set(model, clean, adv, y, protocol="draws-margin", draws=5)
    keys = noise.image_keys(None, clean)
    rows = rows_for(model, "draws", 5)
    bits = [classify(model, x, y, rows, keys=keys) for x in (clean, adv)]
    margins = [selection_margins(model, x, y, rows, keys=keys) for x in (clean, adv)]
    assert got.per_draw == tuple(int(c) for c in final_of_selected(bits, margins).sum(1))
    _, plain = score_set(model, clean, adv, y, protocol="draws", draws=5)
    assert plain.per_draw != got.per_draw


# --- the whole evaluation -----------------------------------------------------------------------------------

def _smoothing() -> str:
    return f"{EXAMPLES / 'smoothing.py'}:smoothing"


def test_skipping_and_shards_give_one_plain_runs_figures(cli, tmp_path, igd_home):
    """IW-WC on the Gaussian-noise example under draws-margin: with skipping (the default) the same worst case and
    per-image decisions as --no-skip; two shards merged, the same tensors (margins included) as one run."""
    common = ["defend-eval", "--model", "demo", "--defense", _smoothing(), "--attack", "iw-wc", "--n-examples", 24,
              "--steps", 2, "--queries", 20, "--eot-iter", 2, "--protocol", "draws-margin"]
    plain = cli(*common, "--no-skip", "--workdir", tmp_path / "a", "--report", tmp_path / "plain.safetensors",
                "--json")
    assert plain.code == 0, plain.err
    pj = plain.json()
    assert pj["protocol"] == "draws-margin" and pj["draws"] == 5
    skipping = cli(*common, "--workdir", tmp_path / "b", "--report", tmp_path / "skip.safetensors", "--json")
    assert skipping.code == 0, skipping.err
    sj = skipping.json()
    assert sj["measured_on_survivors"], "nothing was skipped: the comparison would show nothing"
    for k in ("worst_case", "worst_case_std", "worst_case_majority", "worst_case_all_draws"):
        assert sj[k] == pj[k], k
    a = load_artifact(tmp_path / "plain.safetensors", kind="eval-report")
    b = load_artifact(tmp_path / "skip.safetensors", kind="eval-report")
    row = a.meta["columns"].index("defended:worst_case")
    assert torch.equal(a["correct"][row], b["correct"][row])
    assert "defended_margins" in a.tensors and "base_margins" not in a.tensors  # the base model is deterministic
    parts = []
    for i in range(2):
        part = tmp_path / f"part{i}.safetensors"
        r = cli(*common, "--no-skip", "--workdir", tmp_path / "a", "--shard", f"{i}/2", "--report", part)
        assert r.code == 0, r.err
        parts.append(part)
    m = cli("merge", *parts, "--out", tmp_path / "merged.safetensors", "--json")
    assert m.code == 0, m.err
    c = load_artifact(tmp_path / "merged.safetensors", kind="eval-report")
    assert sorted(a.tensors) == sorted(c.tensors)
    for k in a.tensors:
        assert torch.equal(a.tensors[k], c.tensors[k]), k
    assert m.json()["worst_case"] == pj["worst_case"] and m.json()["protocol"] == "draws-margin"
    # the same sets under the draws protocol: another identity, so the shards of one do not merge with the other's
    other = tmp_path / "draws.safetensors"
    r = cli("defend-eval", *common[1:-2], "--no-skip", "--workdir", tmp_path / "a", "--shard", "1/2", "--report", other)
    assert r.code == 0, r.err
    bad = cli("merge", parts[0], other, "--out", tmp_path / "x.safetensors")
    assert bad.code == 2 and "protocol" in bad.err


@pytest.mark.parametrize("command", [
    ["audit", "--model", "demo", "--defense", "SMOOTHING", "--n-examples", "4"],
    ["analyze", "sweep", "--model", "demo", "--importance", "imp.safetensors", "--over", "k", "--values", "4",
     "--n-examples", "4", "--out", "runs"],
])
def test_audit_and_analyze_refuse_it_in_one_line(cli, command, igd_home):
    args = [_smoothing() if a == "SMOOTHING" else a for a in command]
    r = cli(*args, "--protocol", "draws-margin")
    lines = r.err.strip().splitlines()
    assert r.code == 2 and len(lines) == 1 and lines[0].startswith("error:") and "draws-margin" in lines[0], r.err


def test_a_report_scored_by_margins_without_them_is_refused(boundary):
    """A draws-margin report whose margins are missing cannot be rescored (a merge would select by another rule)."""
    from igd_cli.errors import IgdError
    from igd_cli.eval_result import EvalResult

    model, points, y, _ = boundary
    n = 40
    keys = noise.image_keys(None, points[0][:n])
    rows = rows_for(model, "draws-margin", 3)
    bits = [classify(model, x[:n], y[:n], rows, keys=keys) for x in points[:3]]
    res = EvalResult(y[:n], torch.arange(n), ["a", "b"], torch.ones(1, n, dtype=torch.bool), bits[0], mode="iw-wc",
                     protocol="draws-margin", randomized=True)
    res.defended["weak"], res.defended["other"] = bits[1], bits[2]
    res.margins["defended"] = {k: selection_margins(model, x[:n], y[:n], rows, keys=keys)
                               for k, x in zip(("clean", "weak", "other"), points[:3])}
    tensors = {"y": res.y, "index": res.index, "base_draws": torch.stack(res.candidates(False)).to(torch.uint8),
               "defended_draws": torch.stack(res.candidates(True)).to(torch.uint8),
               "defended_margins": torch.stack(res.candidate_margins(True))}
    meta = {"candidates": {"base": ["clean"], "defended": ["clean", "weak", "other"]}, "protocol": "draws-margin",
            "result": res.to_json()}
    again = EvalResult.from_tensors(meta, tensors)
    assert torch.equal(again.worst(), res.worst())
    del tensors["defended_margins"]
    with pytest.raises(IgdError, match="without the defended model's selection margins"):
        EvalResult.from_tensors(meta, tensors)
