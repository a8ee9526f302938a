"""The whole method in one cached run: rank -> calibrate-k -> transfer sets on the base model -> defend-eval.

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

from .artifacts import file_sha256, read_metadata
from .calibrate import run_calibration
from .common import Target, check_classes, resolve_model_layer
from .data import ImageSet, load_dataset, same_images
from .console import err_console, progress_enabled
from .defense import check_layers, load_defense
from .errors import IgdError
from .evaluate import Budgets, EvalResult, adaptive_temperature, defense_identity, evaluate_defense
from .ranking import RankRequest, get_method, rank
from .scoring import DEFAULT_DRAWS

Stage = Literal["computed", "reused"]

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


@dataclass
class PipelineConfig:
    """Everything that decides the results of a pipeline run (recorded in its artifacts)."""

    layer: str | list[str] | None = None  # several: one mask artifact masking all of them
    method: str = "lo-ir"
    attack: str = "iw-wc"  # iw-wc | aa
    n_probe: int | None = None  # probe images for ranking (first N of the training split; None = all)
    probe_dataset: str | None = None  # ranking images from this data set instead of the target's training split
    allow_overlap: bool = False  # accept probe images that are the evaluation images (a split-less file)
    n_examples: int | None = None  # test images for calibration and evaluation (None = all, at most 1000)
    tolerance: float = 0.5
    k: int | dict[str, int] | None = None  # skip the search (several layers: the layers whose k is fixed)
    eps: float | None = None
    rs: bool = True
    budgets: Budgets = field(default_factory=Budgets)
    clip_model: str = "ViT-B-16"
    clip_pretrained: str = "openai"
    batch_size: int = 128
    seed: int = 0
    protocol: str = "draws"  # how a randomized defence is scored (igd_cli.scoring)
    draws: int = DEFAULT_DRAWS
    bpda_temperature: float | None = None  # the adaptive attack's, IW-WC's tenth column (None: its default)


@dataclass
class PipelineResult:
    out: Path
    stages: dict[str, Stage]
    importance: Path | list[Path]
    mask: Path
    report: Path
    adv_dir: Path
    k: int | dict[str, int]  # several layers: keyed by layer
    n_neurons: int | dict[str, int]
    layer: str
    calibration: dict[str, Any]
    evaluation: dict[str, Any]
    seconds: float
    probe: dict[str, Any] = field(default_factory=dict)  # the ranking images: dataset, split, n

    def to_json(self) -> dict[str, Any]:
        ev = self.evaluation
        keys = ("n_examples", "defended", "clean_accuracy", "clean_accuracy_std", "base_clean_accuracy",
                "robust_accuracy", "robust_accuracy_std", "base_robust_accuracy", "worst_case", "worst_case_std",
                "worst_case_majority", "worst_case_all_draws", "base_worst_case", "draws", "protocol", "randomized",
                "measured_on_survivors", "eps", "mode", "iw_wc_paper", "iw_wc_paper_std", "iw_wc_paper_majority",
                "iw_wc_paper_all_draws", "beyond_paper")
        return {
            **{k: ev.get(k) for k in keys},
            "k": self.k, "n_neurons": self.n_neurons, "layer": self.layer,
            "calibration": {k: self.calibration.get(k) for k in ("k", "base_clean_accuracy", "clean_accuracy",
                                                                  "n_examples", "tolerance", "curve")},
            "probe": dict(self.probe),
            "stages": dict(self.stages),
            "paths": {"out": str(self.out), "mask": str(self.mask),
                      "importance": [str(p) for p in self.importance] if isinstance(self.importance, list)
                      else str(self.importance),
                      "report": str(self.report), "adversarial_sets": str(self.adv_dir)},
            "seconds": round(self.seconds, 3),
        }


def run_pipeline(target: Target, cfg: PipelineConfig, out: str | Path, *, data_dir: str | Path | None = None,
                 force: bool = False) -> PipelineResult:
    """Run (or re-read) every stage for ``target`` into the folder ``out``."""
    t0 = time.perf_counter()
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise IgdError(f"--out {out}: is a file, expected a folder")
    out.mkdir(parents=True, exist_ok=True)
    if cfg.attack not in ("iw-wc", "aa"):
        raise IgdError(f"--attack {cfg.attack}: the pipeline evaluates iw-wc or aa")
    stages: dict[str, Stage] = {}
    show = progress_enabled()
    if cfg.eps is None:
        target.default_eps()  # fail now, not after the ranking, when ε is unknown (the attacks need it)

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
        layer, n_neurons = resolve_model_layer(target, wanted_layer, tuple(probe.get(0, 1).x.shape[1:]))
        importance = out / f"importance-{method.name}-{layer.replace('.', '-')}.safetensors"
        req = RankRequest(model=target.model, layer=layer, n_neurons=n_neurons,
                          num_classes=target.loaded.num_classes, data=probe, neurons=(0, n_neurons),
                          batch_size=cfg.batch_size, seed=cfg.seed, clip_model=cfg.clip_model,
                          clip_pretrained=cfg.clip_pretrained, clip_cache=out / "clip-cache.safetensors",
                          show_progress=show)
        _say(f"[1/4] rank: {method.name} at {layer} on {probe.wording()}")
        ranked = rank(req, method.name, target.provenance(), importance, force=force, shard=False)
        if not ranked.skipped:
            stages["rank"] = "computed"
        layers.append(layer)
        sizes[layer] = n_neurons
        importances.append(importance)
    check_layers(target.model, layers)
    one = len(layers) == 1
    slug = "+".join(layer.replace(".", "-") for layer in layers)

    # 2. calibrate-k (mask), reused when made from these very importance files with the same settings
    mask = out / f"mask-{method.name}-{slug}.safetensors"
    want = _calibration_identity(target, importances, cfg)
    cal = None if force else _reusable_mask(mask, want)
    _say(f"[2/4] calibrate-k: tolerance {cfg.tolerance} points" + (" (reused)" if cal else ""))
    if cal is None:
        cal = run_calibration(target, importances[0] if one else importances, mask, split="test", n_examples=cfg.n_examples,
                              tolerance=cfg.tolerance, eps=cfg.eps, n_smooth=1, rs=cfg.rs, k=cfg.k,
                              batch_size=cfg.batch_size, seed=cfg.seed, data_dir=data_dir,
                              plot=out / f"calibration-{method.name}-{slug}.png",
                              extra_meta={"pipeline_identity": want})
        stages["calibrate"] = "computed"
    else:
        stages["calibrate"] = "reused"

    # 3 + 4. attacks: transfer sets on the base model, then the defended evaluation (sets cached in adv/)
    data = target.data("test", cal["n_examples"], data_dir)
    adv_dir = out / "adv"
    defense = load_defense(target, mask, seed=cfg.seed)
    ident = defense_identity(mask, defense)
    report = out / f"eval-{cfg.attack}-{method.name}-{slug}.safetensors"
    eval_id = {"mask_sha256": ident["mask_sha256"], "attack": cfg.attack, "n_examples": len(data),
               "eps": cfg.eps, "budgets": asdict(cfg.budgets), "seed": cfg.seed, "dataset": data.name,
               "model_fingerprint": target.loaded.fingerprint, "protocol": cfg.protocol, "draws": cfg.draws}
    if cfg.attack == "iw-wc":  # its tenth column, the adaptive attack (beyond the paper)
        eval_id["bpda_temperature"] = adaptive_temperature(cfg.bpda_temperature)
    evaluation = None if force else _reusable_report(report, eval_id)
    if evaluation is not None:
        stages["transfer"] = stages["defend-eval"] = "reused"
    else:
        ran: list[str] = []

        def on_set(attack: str, kind: str, _res) -> None:
            ran.append(f"{kind}:{attack}")

        _say(f"[3/4] attacks on the base model ({cfg.attack}) for transfer, cached in {adv_dir}")
        evaluate_defense(target, None, data, attack=cfg.attack, workdir=adv_dir, budgets=cfg.budgets,
                         eps=cfg.eps, seed=cfg.seed, batch_size=cfg.batch_size, show_progress=show, on_set=on_set)
        stages["transfer"] = "computed" if ran else "reused"
        n_base = len(ran)
        _say(f"[4/4] defend-eval --attack {cfg.attack} on {data.wording()}")
        res: EvalResult = evaluate_defense(target, defense, data, attack=cfg.attack, workdir=adv_dir,
                                           budgets=cfg.budgets, eps=cfg.eps, seed=cfg.seed,
                                           batch_size=cfg.batch_size, defense_meta=ident, show_progress=show,
                                           on_set=on_set, protocol=cfg.protocol, draws=cfg.draws,
                                           bpda_temperature=cfg.bpda_temperature)
        stages["defend-eval"] = "computed"
        evaluation = res.to_json()
        res.save(report, {**target.provenance(), **ident, "pipeline_identity": eval_id,
                          "probe": ranked.meta["data"], "attacks_run": ran, "attacks_run_on_base": ran[:n_base]})
    k = int(cal["k"]) if one else {name: int(cal["k"][name]) for name in layers}
    return PipelineResult(out, stages, importances[0] if one else importances, mask, report, adv_dir, k,
                          sizes[layers[0]] if one else sizes, "+".join(layers), cal, evaluation,
                          time.perf_counter() - t0,
                          probe={**ranked.meta["data"], "file": probe.file is not None})


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


def _say(text: str) -> None:
    err_console.print(text, highlight=False, soft_wrap=True)  # paths stay whole


def _calibration_identity(target: Target, importances: list[Path], cfg: PipelineConfig) -> dict[str, Any]:
    shas = [file_sha256(p) for p in importances]
    return json.loads(json.dumps({
        "model_fingerprint": target.loaded.fingerprint, "importance_sha256": shas[0] if len(shas) == 1 else shas,
        "n_examples": cfg.n_examples, "tolerance": cfg.tolerance, "k": cfg.k, "eps": cfg.eps, "rs": cfg.rs,
        "seed": cfg.seed, "batch_size": cfg.batch_size}))


def _matching_meta(path: Path, kind: str, want: dict[str, Any]) -> dict[str, Any] | None:
    """The metadata of ``path`` when it is a readable ``kind`` artifact made with pipeline identity ``want``."""
    if not path.is_file():
        return None
    try:
        meta = read_metadata(path)
    except IgdError:
        return None  # unreadable: recompute and overwrite
    if meta.get("kind") != kind or meta.get("pipeline_identity") != json.loads(json.dumps(want)):
        return None
    return meta


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
