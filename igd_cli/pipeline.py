"""The whole method in one cached run: rank -> calibrate-k -> transfer sets on the base model -> defend-eval.

With a user's defence (``PipelineConfig.defense``, ``--defense FILE.py:NAME``) there is nothing to rank or
calibrate: the run is the transfer sets and the defended evaluation, with the same caching, pieces and merge.

Every stage writes its artifact into the run folder and is skipped when an artifact made with the same inputs
is already there (model fingerprint, layer, method, data, settings, and the hash of the artifact it was built
from), so a second run with the same arguments only re-reads results, and an interrupted run continues from the
stages (and, inside the evaluation, the attacks) it finished. What each stage did is reported in ``stages``.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from .artifacts import file_sha256, intact, read_metadata
from .batching import BatchChoice, attack_trial, choose_batch_size, rank_trial
from .calibrate import calibration_stream, image_range, run_calibration
from .common import Target, check_classes, resolve_model_layer
from .data import ImageSet, load_dataset, same_images
from .console import err_console, progress_enabled
from .defense import DEFAULT_N_SMOOTH, DEFAULT_TAU, check_layers, load_defense
from .errors import IgdError
from .locks import LockOptions, run_lock
from .precision import precision_meta
from .provenance import difference, refusal
from .evaluate import (PYAUTOATTACK_VERSION, Budgets, EvalResult, adaptive_temperature, attack_revisions,
                       defense_identity, evaluate_defense)
from .ranking import RankRequest, get_method, rank, rank_meta
from .shards import matching_artifact, shard_path
from .scoring import DEFAULT_DRAWS

Stage = Literal["computed", "reused"]
CalibrationImages = Literal["after", "train", "evaluated"]
CALIBRATION_IMAGES: tuple[str, ...] = ("after", "train", "evaluated")

#: Budget presets: ``paper`` keeps every attack's paper budget; ``quick`` is sized so that the embedded demo
#: pipeline (IW-WC, nine attacks) finishes in minutes on 2 CPU cores. ``auto``: quick for ``demo``, else paper.
PRESETS: dict[str, dict[str, int | None]] = {
    "paper": {"n_examples": None, "steps": None, "restarts": None, "queries": None, "eot_iter": None},
    "quick": {"n_examples": 200, "steps": 20, "restarts": 1, "queries": 1000, "eot_iter": 5},
}


def preset_values(preset: str, model_name: str) -> dict[str, int | None]:
    """The defaults a preset gives (explicit options override each of them)."""
    if preset == "auto":
        preset = "quick" if model_name == "demo" else "paper"
    if preset not in PRESETS:
        raise IgdError(f"--preset {preset}: expected auto, quick or paper")
    return {"preset": preset, **PRESETS[preset]}


@dataclass(frozen=True)
class Piece:
    """One piece of a pipeline run, for job arrays (``--piece``): the rows ``start..stop-1`` of the ranking, the
    calibration, or shard ``index`` of ``count`` of the transfer sets or of the defended evaluation. A piece writes
    what the whole run would have computed for it, under the same identities, into the run folder (rank rows into
    ``pieces/``, transfer sets into ``adv/shard-I-of-N/``, evaluation reports into ``pieces/``); a run without
    ``--piece`` then merges complete pieces it finds and reuses them, so its figures are those of one plain run."""

    stage: Literal["rank", "calibrate", "transfer", "defend", "merge"]
    start: int = 0
    stop: int = 0
    index: int = 0
    count: int = 1

    @property
    def name(self) -> str:
        if self.stage == "rank" and self.stop:
            return f"rank-{self.start}-{self.stop}"
        return self.stage if self.stage in ("rank", "calibrate", "merge") else f"{self.stage}-{self.index}-of-{self.count}"


def parse_piece(text: str | None) -> Piece | None:
    """``--piece rank:A:B | rank | calibrate | transfer:I/N | defend:I/N | merge`` (None: the whole run). ``rank``
    alone: the whole ranking (merging its pieces) and stop; ``merge``: join the defended-evaluation pieces into
    the run's report, failing in one line when one is missing or corrupted."""
    if text is None:
        return None
    stage, _, rest = text.strip().partition(":")
    try:
        if stage in ("calibrate", "rank", "merge") and not rest:
            return Piece(stage)
        if stage == "rank":
            a, b = (int(v) for v in rest.split(":"))
            if 0 <= a < b:
                return Piece("rank", start=a, stop=b)
        if stage in ("transfer", "defend"):
            i, n = (int(v) for v in rest.split("/"))
            if 0 <= i < n:
                return Piece(stage, index=i, count=n)
    except ValueError:
        pass
    raise IgdError(f"--piece {text}: expected rank:A:B, rank, calibrate, transfer:I/N, defend:I/N or merge")


@dataclass
class PipelineConfig:
    """Everything that decides the results of a pipeline run (recorded in its artifacts)."""

    layer: str | list[str] | None = None  # several: one mask artifact masking all of them
    method: str = "lo-ir"
    attack: str = "iw-wc"  # iw-wc | aa
    n_probe: int | None = None  # probe images for ranking (first N of the training split; None = all)
    probe_dataset: str | None = None  # ranking images from this data set instead of the target's training split
    allow_overlap: bool = False  # accept probe images that are the evaluation images (a split-less file)
    n_examples: int | None = None  # test images evaluated (None = all, at most 1000)
    #: where k is chosen (never on the evaluated images by default): "after" the test images right after the
    #: evaluated ones, "train" the training images right after the probe images, "evaluated" the evaluated ones
    calibration_images: CalibrationImages = "after"
    n_calibration: int | None = None  # images k is chosen on (None: as many as are evaluated, or what remains)
    tolerance: float = 0.5
    k: int | dict[str, int] | None = None  # skip the search (several layers: the layers whose k is fixed)
    eps: float | None = None
    rs: bool = True
    sigma: float | None = None  # the smoothing noise std (None: ε/2)
    tau: float = DEFAULT_TAU
    n_smooth: int = DEFAULT_N_SMOOTH
    budgets: Budgets = field(default_factory=Budgets)
    clip_model: str = "ViT-B-16"
    clip_pretrained: str = "openai"
    batch_size: int | str = 128  # or "auto" (igd_cli.batching), resolved per stage
    seed: int = 0
    protocol: str = "draws"  # how a randomized defence is scored (igd_cli.scoring)
    draws: int = DEFAULT_DRAWS
    bpda_temperature: float | None = None  # the adaptive attack's, IW-WC's tenth column (None: its default)
    precision: str = "fp32"  # ranking, calibration and clean scoring under autocast; attacks fp32 (igd_cli.precision)
    defense: str | None = None  # a user's defence (FILE.py:NAME, igd_cli.contract) instead of IG-Defense


@dataclass
class PipelineResult:
    out: Path
    stages: dict[str, Stage]
    importance: Path | list[Path] | None  # None for a user's defence (no ranking)
    mask: Path | None
    report: Path
    adv_dir: Path
    k: int | dict[str, int] | None  # several layers: keyed by layer
    n_neurons: int | dict[str, int] | None
    layer: str | None
    calibration: dict[str, Any]
    evaluation: dict[str, Any]
    seconds: float
    probe: dict[str, Any] = field(default_factory=dict)  # the ranking images: dataset, split, n
    record: dict[str, Any] = field(default_factory=dict)  # igd_code and numerics (igd_cli.provenance.record)
    auto_batch: dict[str, Any] = field(default_factory=dict)  # stage -> how --batch-size auto chose (igd_cli.batching)
    defense: dict[str, Any] | None = None  # a user's defence: its spec, source sha256, fingerprint, settings

    def to_json(self) -> dict[str, Any]:
        ev = self.evaluation
        keys = ("n_examples", "defended", "clean_accuracy", "clean_accuracy_std", "base_clean_accuracy",
                "robust_accuracy", "robust_accuracy_std", "base_robust_accuracy", "worst_case", "worst_case_std",
                "worst_case_majority", "worst_case_all_draws", "base_worst_case", "draws", "protocol", "randomized",
                "measured_on_survivors", "eps", "mode", "iw_wc_paper", "iw_wc_paper_std", "iw_wc_paper_majority",
                "iw_wc_paper_all_draws", "beyond_paper", "defense_label", "no_gradient")
        return {
            **{k: ev.get(k) for k in keys},
            "k": self.k, "n_neurons": self.n_neurons, "layer": self.layer,
            "calibration": {k: self.calibration.get(k) for k in ("k", "base_clean_accuracy", "clean_accuracy",
                                                                  "n_examples", "tolerance", "curve", "images")},
            "probe": dict(self.probe),
            "stages": dict(self.stages),
            "paths": {"out": str(self.out), "mask": None if self.mask is None else str(self.mask),
                      "importance": [str(p) for p in self.importance] if isinstance(self.importance, list)
                      else None if self.importance is None else str(self.importance),
                      "report": str(self.report), "adversarial_sets": str(self.adv_dir)},
            "seconds": round(self.seconds, 3),
            **({"defense": dict(self.defense)} if self.defense is not None else {}),
            **self.record,
            **({"auto_batch": dict(self.auto_batch)} if self.auto_batch else {}),
        }


def run_pipeline(target: Target, cfg: PipelineConfig, out: str | Path, *, data_dir: str | Path | None = None,
                 force: bool = False, piece: Piece | None = None,
                 lock: LockOptions | None = None) -> PipelineResult | dict[str, Any]:
    """Run (or re-read) every stage for ``target`` into the folder ``out``, holding the folder's lock
    (``igd_cli.locks``: a second process on the same folder waits for it instead of mixing its results in). With
    ``piece``, compute that piece only (the pieces of one run go on in parallel; a plain run and a piece exclude
    each other) and return what it wrote and its ``seconds``."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise IgdError(f"--out {out}: is a file, expected a folder")
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with run_lock(out, None if piece is None else piece.name, lock):
        res = _run_pipeline(target, cfg, out, data_dir=data_dir, force=force, piece=piece)
    if isinstance(res, dict):  # a piece: its wall time, which cluster/slurm/size.py sizes jobs from
        res["seconds"] = round(time.perf_counter() - t0, 3)
        res.update(target.record())
    return res


def _run_pipeline(target: Target, cfg: PipelineConfig, out: Path, *, data_dir: str | Path | None,
                  force: bool, piece: Piece | None = None) -> PipelineResult | dict[str, Any]:
    t0 = time.perf_counter()
    if cfg.attack not in ("iw-wc", "aa"):
        raise IgdError(f"--attack {cfg.attack}: the pipeline evaluates iw-wc or aa")
    stages: dict[str, Stage] = {}
    auto: dict[str, Any] = {}  # stage -> how --batch-size auto chose, for the result
    show = progress_enabled()
    # ε as every stage uses it (σ = ε/2 of the smoothing, the attacks' budget): failing now, not after the ranking,
    # when it is unknown; identities store this value, not the option as given
    eps = float(cfg.eps) if cfg.eps is not None else float(target.default_eps())
    norm = target.threat_model
    if piece is not None and piece.stage == "transfer":  # the base model's sets need neither ranking nor mask
        data = target.eval_data("test", cfg.n_examples, data_dir)
        check_classes(target, data)
        return _run_eval_piece(piece, target, cfg, data, None, {}, {}, out / "report", out / "adv", eps, norm,
                               progress_enabled(), _eval_batch(cfg, target, target.model, data, eps).size)
    if cfg.defense is not None:
        return _run_own_defense(target, cfg, out, eps, norm, data_dir=data_dir, force=force, piece=piece, t0=t0)

    # 1. rank (the probe set: the first n_probe training images, or of --probe-dataset), one importance file per
    # masked layer
    probe = load_dataset(cfg.probe_dataset or target.dataset, "train", cfg.n_probe, data_dir)
    check_classes(target, probe)
    if probe.file is not None:  # named data sets keep training and test images apart; a file has no splits
        check_probe_overlap(probe, target.data("test", None, data_dir), cfg)
    method = get_method(cfg.method)
    wanted = cfg.layer if isinstance(cfg.layer, list) and cfg.layer else [cfg.layer if cfg.layer else None]
    layers, sizes, importances = [], {}, []
    stages["rank"] = "reused"
    for wanted_layer in wanted:
        chosen: dict[str, str] = {}
        layer, n_neurons = resolve_model_layer(target, wanted_layer, tuple(probe.get(0, 1).x.shape[1:]), chosen)
        importance = out / f"importance-{method.name}-{layer.replace('.', '-')}.safetensors"
        req = RankRequest(model=target.model, layer=layer, n_neurons=n_neurons,
                          num_classes=target.loaded.num_classes, data=probe, neurons=(0, n_neurons),
                          batch_size=cfg.batch_size, seed=cfg.seed, clip_model=cfg.clip_model,
                          clip_pretrained=cfg.clip_pretrained, clip_cache=out / "clip-cache.safetensors",
                          show_progress=show, precision=cfg.precision)
        if cfg.batch_size == "auto":
            choice = choose_batch_size("auto", default=PIPELINE_BATCH, device=target.device, cap=len(probe),
                                       try_batch=rank_trial(req, method.name), what=f"{method.name} ranking")
            req.batch_size = choice.size
            auto[f"rank {layer}"] = choice.to_json()
            req.clip_batch_size = PIPELINE_BATCH
        if piece is not None and piece.stage == "rank" and piece.stop:
            if len(wanted) > 1:
                raise IgdError("--piece rank:A:B: rank pieces cover one masked layer (give one --layer)")
            if piece.stop > n_neurons:
                raise IgdError(f"--piece rank:{piece.start}:{piece.stop}: {layer} has N = {n_neurons} neurons")
            req.neurons = (piece.start, piece.stop)
            part = rank(req, method.name, target.provenance(), shard_path(out / "pieces" / importance.name,
                                                                          piece.start, piece.stop),
                        force=force, shard=True)
            return {"piece": piece.name, "out": str(part.out), "skipped": part.skipped,
                    "neurons": [piece.start, piece.stop]}
        _say(f"[1/4] rank: {method.name} at {layer}"
             + (f" ({chosen['layer_chosen_by']})" if chosen else "") + f" on {probe.wording()}")
        if not force:
            merge_rank_pieces(out / "pieces", importance, rank_meta(target.provenance(), req, method))
        ranked = rank(req, method.name, target.provenance(), importance, force=force, shard=False, note=chosen)
        if not ranked.skipped:
            stages["rank"] = "computed"
        layers.append(layer)
        sizes[layer] = n_neurons
        importances.append(importance)
    check_layers(target.model, layers)
    if piece is not None and piece.stage == "rank":  # the whole ranking, merged from its pieces
        return {"piece": piece.name, "out": [str(p) for p in importances], "stages": dict(stages)}
    one = len(layers) == 1
    slug = "+".join(layer.replace(".", "-") for layer in layers)

    # 2. calibrate-k (mask) on images held out from the evaluation, reused when made from these very importance
    # files with the same settings
    mask = out / f"mask-{method.name}-{slug}.safetensors"
    data = target.eval_data("test", cfg.n_examples, data_dir)
    cal_data = calibration_data(target, cfg, data, probe, data_dir)
    want = _calibration_identity(target, importances, cfg, eps, cal_data)
    cal = None if force else _reusable_mask(mask, want)
    _say(f"[2/4] calibrate-k: tolerance {cfg.tolerance} points" + (" (reused)" if cal else ""))
    if cal is None:
        cal = run_calibration(target, importances[0] if one else importances, mask, split=cal_data.split,
                              data=cal_data, tolerance=cfg.tolerance, eps=eps, sigma=cfg.sigma, tau=cfg.tau,
                              n_smooth=cfg.n_smooth, rs=cfg.rs, k=cfg.k,
                              batch_size=cfg.batch_size, seed=cfg.seed, data_dir=data_dir,
                              precision=cfg.precision, auto_default=PIPELINE_BATCH,
                              plot=out / f"calibration-{method.name}-{slug}.png",
                              extra_meta={"pipeline_identity": want})
        stages["calibrate"] = "computed"
        if cal.get("auto_batch"):
            auto["calibrate"] = cal["auto_batch"]
    else:
        stages["calibrate"] = "reused"
    if piece is not None and piece.stage == "calibrate":
        return {"piece": piece.name, "out": str(mask), "k": cal["k"], "stages": stages}

    cal["images"] = {**image_range(cal_data), "held_out": cfg.calibration_images != "evaluated"}

    # 3 + 4. attacks: transfer sets on the base model, then the defended evaluation (sets cached in adv/)
    defense = load_defense(target, mask, seed=cfg.seed)
    ident = defense_identity(mask, defense)
    report = out / f"eval-{cfg.attack}-{method.name}-{slug}.safetensors"
    eval_id = _eval_identity(target, cfg, data, eps, norm, {"mask_sha256": ident["mask_sha256"],
                                                            "defense": ident.get("settings")})
    evaluation = _evaluate(target, cfg, out, data, defense, ident, eval_id, report, eps, norm, stages, auto, piece,
                           {"probe": ranked.meta["data"]}, force)
    if piece is not None:
        return evaluation
    k = int(cal["k"]) if one else {name: int(cal["k"][name]) for name in layers}
    return PipelineResult(out, stages, importances[0] if one else importances, mask, report, out / "adv", k,
                          sizes[layers[0]] if one else sizes, "+".join(layers), cal, evaluation,
                          time.perf_counter() - t0,
                          probe={**ranked.meta["data"], "file": probe.file is not None}, record=target.record(),
                          auto_batch=auto)


#: what identifies a user's defence in a pipeline run's identity: its source and code, never the path it was given by
OWN_DEFENSE_IDENTITY = ("callable", "source_sha256", "defense_fingerprint", "settings", "randomized")


def _run_own_defense(target: Target, cfg: PipelineConfig, out: Path, eps: float, norm: str, *,
                     data_dir: str | Path | None, force: bool, piece: Piece | None,
                     t0: float) -> PipelineResult | dict[str, Any]:
    """The pipeline of a user's defence (``cfg.defense``): transfer sets on the base model, then the defended
    evaluation, with the cache, pieces and merge of IG-Defense's run; there is nothing to rank or calibrate."""
    from . import contract

    if piece is not None and piece.stage in ("rank", "calibrate"):
        raise IgdError(f"--piece {piece.name}: --defense {cfg.defense} has no ranking or calibration (its pieces: "
                       f"transfer:I/N, defend:I/N, merge)")
    data = target.eval_data("test", cfg.n_examples, data_dir)
    check_classes(target, data)
    defense = contract.build_defense(cfg.defense, target.model)
    ident = defense.identity()
    own = {key: ident[key] for key in OWN_DEFENSE_IDENTITY}
    report = out / f"eval-{cfg.attack}-defense-{_slug(ident['callable'])}.safetensors"
    eval_id = _eval_identity(target, cfg, data, eps, norm, {"own_defense": own})
    stages: dict[str, Stage] = {}
    auto: dict[str, Any] = {}
    evaluation = _evaluate(target, cfg, out, data, defense, ident, eval_id, report, eps, norm, stages, auto, piece,
                           {}, force)
    if piece is not None:
        return evaluation
    return PipelineResult(out, stages, None, None, report, out / "adv", None, None, None, {}, evaluation,
                          time.perf_counter() - t0, record=target.record(), auto_batch=auto,
                          defense={"spec": cfg.defense, **own})


def _slug(name: str) -> str:
    """A callable's name as part of a file name."""
    return "".join(c if c.isalnum() or c in "-_" else "-" for c in name)


def _eval_identity(target: Target, cfg: PipelineConfig, data: ImageSet, eps: float, norm: str,
                   defended: dict[str, Any]) -> dict[str, Any]:
    """What decides the defended evaluation's report: the defended model (``defended``: IG-Defense's mask and
    settings, or a user's defence by its source and fingerprint), images, attack, ε, budgets, seed, attack
    revisions, scoring, precision, igd's code and the numerics; not the batch size."""
    eval_id = {**defended, "attack": cfg.attack, "data": data.identity(), "eps": eps, "norm": norm,
               "budgets": asdict(cfg.budgets), "seed": cfg.seed, "revisions": attack_revisions(cfg.attack),
               "pyautoattack": PYAUTOATTACK_VERSION, "model_fingerprint": target.loaded.fingerprint,
               "protocol": cfg.protocol, "draws": cfg.draws, **precision_meta(cfg.precision), **target.identity()}
    if cfg.attack == "iw-wc":  # its tenth column, the adaptive attack (beyond the paper)
        eval_id["bpda_temperature"] = adaptive_temperature(cfg.bpda_temperature)
    return eval_id


def _evaluate(target: Target, cfg: PipelineConfig, out: Path, data: ImageSet, defense: Any, ident: dict[str, Any],
              eval_id: dict[str, Any], report: Path, eps: float, norm: str, stages: dict[str, Stage],
              auto: dict[str, Any], piece: Piece | None, extra_meta: dict[str, Any], force: bool) -> dict[str, Any]:
    """Stages 3 and 4 (or the defend/merge piece): the transfer sets on the base model, then the defended
    evaluation with them, reused from ``report`` when it matches ``eval_id``; the evaluation's JSON."""
    adv_dir = out / "adv"
    show = progress_enabled()
    if piece is not None and piece.stage == "merge":
        merge_eval_pieces(out / "pieces", report, eval_id, strict=True)
        return {"piece": piece.name, "out": str(report)}
    if piece is not None:  # defend:I/N
        return _run_eval_piece(piece, target, cfg, data, defense, ident, eval_id, report, adv_dir, eps, norm, show,
                               _eval_batch(cfg, target, defense, data, eps).size)
    if not force:
        merge_eval_pieces(out / "pieces", report, eval_id)
    evaluation = None if force else _reusable_report(report, eval_id)
    if evaluation is not None:
        stages["transfer"] = stages["defend-eval"] = "reused"
        return evaluation
    ran: list[str] = []
    steps = ("1/2", "2/2") if cfg.defense is not None else ("3/4", "4/4")  # a user's defence: no rank, no calibrate

    def on_set(attack: str, kind: str, _res) -> None:
        ran.append(f"{kind}:{attack}")

    choice = _eval_batch(cfg, target, defense, data, eps)  # searched only when attacks will run
    eval_bs = choice.size
    if choice.auto:
        auto["attacks"] = choice.to_json()
    _say(f"[{steps[0]}] attacks on the base model ({cfg.attack}) for transfer, cached in {adv_dir}")
    evaluate_defense(target, None, data, attack=cfg.attack, workdir=adv_dir, budgets=cfg.budgets,
                     eps=eps, norm=norm, seed=cfg.seed, batch_size=eval_bs, show_progress=show,
                     on_set=on_set)
    stages["transfer"] = "computed" if ran else "reused"
    n_base = len(ran)
    _say(f"[{steps[1]}] defend-eval --attack {cfg.attack} on {data.wording()}")
    res: EvalResult = evaluate_defense(target, defense, data, attack=cfg.attack, workdir=adv_dir,
                                       budgets=cfg.budgets, eps=eps, norm=norm, seed=cfg.seed,
                                       batch_size=eval_bs, defense_meta=ident, show_progress=show,
                                       on_set=on_set, protocol=cfg.protocol, draws=cfg.draws,
                                       bpda_temperature=cfg.bpda_temperature, precision=cfg.precision)
    stages["defend-eval"] = "computed"
    res.save(report, {**target.provenance(), **ident, "pipeline_identity": eval_id, **extra_meta,
                      "attacks_run": ran, "attacks_run_on_base": ran[:n_base]})
    return res.to_json()


def _run_eval_piece(piece: Piece, target: Target, cfg: PipelineConfig, data: ImageSet, defense, ident: dict[str, Any],
                    eval_id: dict[str, Any], report: Path, adv_dir: Path, eps: float, norm: str,
                    show: bool, batch_size: int) -> dict[str, Any]:
    """Shard ``piece.index`` of ``piece.count`` of the images: the transfer sets on the base model (``transfer``),
    or the defended evaluation with them (``defend``), kept in ``adv/shard-I-of-N`` (the sets) and ``pieces/``
    (the report), as the whole run would compute them for these images."""
    n = len(data)
    if piece.count > n:
        raise IgdError(f"--piece {piece.stage}:{piece.index}/{piece.count}: {piece.count} shards for {n} images")
    positions = torch.arange(piece.index * n // piece.count, (piece.index + 1) * n // piece.count)
    workdir = adv_dir / f"shard-{piece.index}-of-{piece.count}"
    kw = dict(attack=cfg.attack, workdir=workdir, budgets=cfg.budgets, eps=eps, norm=norm, seed=cfg.seed,
              batch_size=batch_size, show_progress=show, positions=positions)
    if piece.stage == "transfer":
        evaluate_defense(target, None, data, **kw)
        return {"piece": piece.name, "out": str(workdir), "positions": [int(positions[0]), int(positions[-1]) + 1]}
    path = report.parent / "pieces" / f"{report.stem}.shard-{piece.index}-of-{piece.count}{report.suffix}"
    span = [int(positions[0]), int(positions[-1]) + 1]
    if path.exists():
        if _matching_meta(path, "eval-report", eval_id) is not None:  # finished before: not recomputed
            return {"piece": piece.name, "out": str(path), "positions": span, "skipped": True}
        if not intact(path):  # written atomically, so only something outside igd can have damaged it: say so
            raise IgdError(f"{path}: corrupted (unreadable, or its tensors do not match their digest): remove it "
                           f"and rerun this piece")
    res = evaluate_defense(target, defense, data, defense_meta=ident, protocol=cfg.protocol, draws=cfg.draws,
                           bpda_temperature=cfg.bpda_temperature, precision=cfg.precision, **kw)
    res.save(path, {**target.provenance(), **ident, "pipeline_identity": eval_id, "eval_identity": eval_id,
                    "data": {"dataset": data.name, "split": data.split, "n": n},
                    "shard": [piece.index, piece.count], "positions": [int(positions[0]), int(positions[-1]) + 1]})
    return {"piece": piece.name, "out": str(path), "positions": span, "skipped": False}


def merge_rank_pieces(folder: Path, importance: Path, meta: dict[str, Any]) -> bool:
    """Merge the rank pieces in ``folder`` into ``importance`` when they are of this ranking (its identity) and
    cover every neuron; nothing when the importance already matches or the pieces are incomplete."""
    from .shards import IMPORTANCE_IDENTITY, identity_of, merge

    if not folder.is_dir() or matching_artifact(importance, "importance", meta,
                                                (meta["n_neurons"], meta["num_classes"])) is not None:
        return False
    want = json.loads(json.dumps(identity_of(meta, IMPORTANCE_IDENTITY)))
    found = []
    for path in sorted(folder.glob(f"{importance.stem}.*-*{importance.suffix}")):
        try:
            have = read_metadata(path)
        except IgdError:
            continue
        if have.get("kind") != "importance-shard":
            continue
        if identity_of(have, IMPORTANCE_IDENTITY) == want and intact(path):
            found.append(path)
        else:
            _note_other_make(path, have, meta, "not merged")
    spans = sorted(tuple(read_metadata(p)["neurons"]) for p in found)
    if not spans or spans[0][0] != 0 or spans[-1][1] != meta["n_neurons"] or \
            any(a[1] != b[0] for a, b in zip(spans, spans[1:])):
        return False
    merge(found, importance)
    return True


def merge_eval_pieces(folder: Path, report: Path, eval_id: dict[str, Any], strict: bool = False) -> bool:
    """Merge the defended-evaluation pieces in ``folder`` into ``report`` when they belong to this evaluation
    (``eval_id``) and together hold every image once; nothing otherwise, or (``strict``) one error line naming
    what is missing or corrupted."""
    from .artifacts import load_artifact
    from .eval_shards import merge_reports

    if not strict and (not folder.is_dir() or _matching_meta(report, "eval-report", eval_id, note=False) is not None):
        return False
    if strict and _matching_meta(report, "eval-report", eval_id, note=False) is not None:
        return False  # already merged
    want = json.loads(json.dumps(eval_id))
    groups: dict[int, list[Path]] = {}
    other: tuple[Path, tuple[str, str, str]] | None = None  # a piece of this evaluation made otherwise
    pattern = f"{report.stem}.shard-*-of-*{report.suffix}"
    for path in sorted(folder.glob(pattern)) if folder.is_dir() else []:
        try:
            have = read_metadata(path)
        except IgdError:
            if strict:
                raise IgdError(f"{path}: not a readable evaluation piece (corrupted?): remove it and rerun its "
                               f"piece") from None
            continue
        if have.get("kind") == "eval-report" and have.get("pipeline_identity") == want:
            if not intact(path):
                if strict:
                    raise IgdError(f"{path}: corrupted (its tensors do not match their digest): remove it and "
                                   f"rerun its piece")
                continue
            groups.setdefault(int(have["shard"][1]), []).append(path)
        elif have.get("kind") == "eval-report" and other is None:
            made = difference(have.get("pipeline_identity") or {}, want)
            other = (path, made) if made is not None else None
    for count, paths in groups.items():
        if len(paths) == count:
            try:
                merge_reports([load_artifact(p, kind="eval-report") for p in paths], report)
            except IgdError:
                if strict:
                    raise
                continue  # the plain run computes the evaluation itself
            return True
    if strict and other is not None:
        raise IgdError(f"{other[0]}: {refusal(other[1])}: merge with the install, --device and --numerics that "
                       f"made the pieces, or rerun them with these")
    if strict:
        have = ", ".join(f"{len(p)} of {c}" for c, p in groups.items()) or "none"
        raise IgdError(f"{folder}: the defended-evaluation pieces of this run are incomplete ({have} found, as "
                       f"{pattern}): run the missing defend:I/N pieces")
    if other is not None:
        _say(f"note: {other[0]}: {refusal(other[1])}: not merged")
    return False


def check_probe_overlap(probe: ImageSet, evaluation: ImageSet, cfg: PipelineConfig) -> None:
    """Refuse to rank on the images the pipeline then calibrates and attacks on (a tensor file has no splits), unless
    ``cfg.allow_overlap``: the paper probes with training images."""
    if cfg.allow_overlap or not same_images(probe, evaluation):
        return
    if cfg.probe_dataset is None:
        raise IgdError(f"--dataset {evaluation.name} is a file without a training split: ranking would probe the "
                       f"very images it evaluates; pass --probe-dataset TRAIN.safetensors (or --allow-overlap)")
    raise IgdError(f"--probe-dataset {cfg.probe_dataset}: the same images as the evaluation set {evaluation.name}; "
                   f"pass training images (or --allow-overlap)")


#: the pipeline's default --batch-size (what ``auto`` is on a CPU)
PIPELINE_BATCH = 128


def _eval_batch(cfg: PipelineConfig, target: Target, model: Any, data: ImageSet, eps: float) -> BatchChoice:
    """The attack stages' batch: ``cfg.batch_size``, or with ``auto`` the largest batch of the attacks themselves
    (``cfg.attack``'s, state included, on ``model`` and the base model; igd_cli.batching) that fits."""
    models = [model] if model is target.model else [model, target.model]
    trial = attack_trial(models, data, cfg.attack, eps=eps, norm=target.threat_model,
                         num_classes=target.loaded.num_classes, seed=cfg.seed)
    return choose_batch_size(cfg.batch_size, default=PIPELINE_BATCH, device=target.device, cap=len(data),
                             try_batch=trial, what=f"the {cfg.attack} attacks")


def _say(text: str) -> None:
    err_console.print(text, highlight=False, soft_wrap=True)  # paths stay whole


def calibration_data(target: Target, cfg: PipelineConfig, evaluated: ImageSet, probe: ImageSet,
                     data_dir: str | Path | None) -> ImageSet:
    """The images k is chosen on (``cfg.calibration_images``): never the evaluated ones unless asked, so that no
    reported figure comes from images the defence was tuned on."""
    if cfg.calibration_images not in CALIBRATION_IMAGES:
        raise IgdError(f"--calibration-images {cfg.calibration_images}: expected {', '.join(CALIBRATION_IMAGES)}")
    n = cfg.n_calibration
    if cfg.calibration_images == "evaluated":
        return evaluated if n is None else target.eval_data("test", min(n, len(evaluated)), data_dir)
    if cfg.calibration_images == "after":
        whole, start, hint = target.data("test", None, data_dir), len(evaluated), "fewer --n-examples"
        split = "test"
    else:
        if cfg.n_probe is None:
            raise IgdError("--calibration-images train: give --n-probe (k is chosen on the training images after "
                           "the probe images)")
        whole, start, hint = load_dataset(probe.name if probe.file is None else str(probe.file), "train", None,
                                          data_dir), len(probe), "fewer --n-probe"
        split = "train"
    left = len(whole) - start
    if left < 1:
        raise IgdError(f"--calibration-images {cfg.calibration_images}: the {split} split has no images after the "
                       f"first {start} ({len(whole)} in all): use {hint}, or --calibration-images evaluated")
    n = min(len(evaluated) if n is None else n, left)
    return whole.view(start, start + n)


def calibration_caption(images: dict[str, Any], n_evaluated: int) -> str:
    """One line saying which images k was chosen on, and whether they are held out from the evaluated ones."""
    a, n = int(images.get("start", 0)), int(images["n"])
    where = f"{images.get('split')} images {a}..{a + n - 1}"
    if not images.get("held_out", True):
        return f"k chosen on {where}: the evaluated images themselves (the figures are not held out from tuning)"
    return f"k chosen on {where}, held out from the {n_evaluated} evaluated test images"


def _calibration_identity(target: Target, importances: list[Path], cfg: PipelineConfig, eps: float,
                          data: ImageSet) -> dict[str, Any]:
    """What decides the mask: the model, the importance files' contents, the images calibrated on (by content and
    position), tolerance, fixed k, ε, the defence settings, smoothing, seed, igd's code and the numerics; not the
    batch size (it changes no figure)."""
    shas = [file_sha256(p) for p in importances]
    return json.loads(json.dumps({
        "model_fingerprint": target.loaded.fingerprint, "importance_sha256": shas[0] if len(shas) == 1 else shas,
        "data": data.identity(), "tolerance": cfg.tolerance, "k": cfg.k, "eps": eps, "rs": cfg.rs,
        "sigma": cfg.sigma, "tau": cfg.tau, "n_smooth": cfg.n_smooth,
        "seed": cfg.seed, "noise_seed": calibration_stream(cfg.seed) if cfg.rs else None,
        **precision_meta(cfg.precision), **target.identity()}))


def _matching_meta(path: Path, kind: str, want: dict[str, Any], note: bool = True) -> dict[str, Any] | None:
    """The metadata of ``path`` when it is a readable ``kind`` artifact made with pipeline identity ``want``; one
    note line (``note``) when it is this stage made by other igd code or with other numerics."""
    if not path.is_file():
        return None
    try:
        meta = read_metadata(path)
    except IgdError:
        return None  # unreadable: recompute and overwrite
    if meta.get("kind") != kind or meta.get("pipeline_identity") != json.loads(json.dumps(want)):
        if note and meta.get("kind") == kind:
            _note_other_make(path, meta.get("pipeline_identity") or {}, want, "recomputing it")
        return None
    if not intact(path):
        return None  # corrupted: recompute and overwrite
    return meta


def _note_other_make(path: Path, have: dict[str, Any], want: dict[str, Any], what: str) -> None:
    """One note line when ``path`` (metadata or identity ``have``) was made by other igd code or with other numerics
    than ``want``: it is not reused, and this says why."""
    made = difference(have, want)
    if made is not None:
        _say(f"note: {path}: {refusal(made)}: {what}")


def _reusable_mask(path: Path, want: dict[str, Any]) -> dict[str, Any] | None:
    """The calibration stored in an existing mask made with the same identity, else None."""
    meta = _matching_meta(path, "mask", want)
    if meta is None:
        return None
    cal = dict(meta.get("calibration") or {})
    cal.update({"k": meta["k"], "out": str(path)})
    return cal


def _reusable_report(path: Path, want: dict[str, Any]) -> dict[str, Any] | None:
    """The evaluation result stored in an existing report made with the same identity, else None."""
    meta = _matching_meta(path, "eval-report", want)
    return None if meta is None else meta.get("result")
