"""Option types shared by every command (the names are the CLI contract in CLI.md)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

Model = Annotated[str, typer.Option("--model", metavar="MODEL", help="demo | RobustBench zoo name | torchvision:NAME | PATH.pt/.pth/.safetensors (with --arch)")]
Arch = Annotated[Optional[str], typer.Option("--arch", metavar="ARCH", help="architecture of a state-dict file: resnet18, preact-resnet18, wrn-34-10, resnet50, demo-cnn, or your own MODULE:CALLABLE or path/to/file.py:CALLABLE")]
Normalize = Annotated[Optional[str], typer.Option("--normalize", metavar="MEAN,STD", help="wrap a state-dict model whose normalisation is not inside it: MEAN,STD per channel (0.5,0.5 or m1,m2,m3,s1,s2,s3) or cifar10, cifar100, imagenet, mnist")]
Dataset = Annotated[Optional[str], typer.Option("--dataset", metavar="DATASET", help="digits | cifar10 | cifar100 | imagenet | PATH.safetensors (default: the model's own)")]
DataDir = Annotated[Optional[Path], typer.Option("--data-dir", metavar="DIR", envvar="IGD_DATA_DIR", help="where torchvision data sets or ImageNet folders live")]
ZooDataset = Annotated[Optional[str], typer.Option("--zoo-dataset", metavar="DATASET", help="RobustBench zoo name listed under several data sets (cifar10, cifar100, imagenet): which entry to load (default: --dataset if it is one of them, else the one whose checkpoint is in the model dir, else cifar10); --dataset only chooses the images")]
_PROBE = "ranking images, when not the training split of --dataset: a data set name ({split}) or PATH.safetensors, e.g. the training file beside a test file"
ProbeDataset = Annotated[Optional[str], typer.Option("--probe-dataset", metavar="DATASET", help=_PROBE.format(split="its --split"))]
#: igd pipeline ranks on the training split of a named data set (it has no --split)
PipelineProbeDataset = Annotated[Optional[str], typer.Option("--probe-dataset", metavar="DATASET", help=_PROBE.format(split="its training split"))]
ThreatModel = Annotated[str, typer.Option("--threat-model", metavar="Linf|L2", help="Linf or L2")]
Device = Annotated[str, typer.Option("--device", metavar="DEVICE", help="auto, cpu, cuda, cuda:N")]
AutoBatchSize = Annotated[str, typer.Option("--batch-size", metavar="N|auto", help="images per forward pass, or auto: on a CUDA "
                                            "device the largest batch of this stage's real workload (an attack's "
                                            "state included) that fits with 15% of the memory left free (binary "
                                            "search on allocation failures); on a CPU the default")]
Precision = Annotated[str, typer.Option("--precision", metavar="fp32|bf16|fp16", help="fp32 | bf16 | fp16: ranking and the defended "
                                        "forward (clean scoring, calibration) under torch.autocast; attacks "
                                        "always run in fp32 (low precision can mask gradients)")]
DefenseOpt = Annotated[Optional[str], typer.Option("--defense", metavar="FILE.py:NAME", help="your own test-time defence: NAME(base_model) returns the defended model (path/to/file.py:NAME or MODULE:NAME; docs/own-defense.md); instead of --mask")]
Numerics = Annotated[str, typer.Option("--numerics", metavar="pinned|fast", help="floating point on a GPU: pinned (TF32 off, "
                                      "deterministic algorithms, no cuDNN autotuning: a rerun on the same GPU gives "
                                      "the same bits) or fast (TF32 and cuDNN autotuning: faster on Ampere and later "
                                      "GPUs, figures can move). Recorded in every result; caches and merges keep the "
                                      "two apart. A CPU computes the same with either")]
Seed = Annotated[int, typer.Option("--seed", metavar="INT", help="random seed: the same seed gives the same result")]
Json = Annotated[bool, typer.Option("--json", help="print exactly one JSON object, the result, on stdout")]
Layer = Annotated[Optional[str], typer.Option("--layer", metavar="LAYER", help="dotted module name of the masked layer (default: the model's penultimate layer; for your own --arch the module feeding the classifier, when one does: igd layers names it)")]
_EPS_DEFAULT = ("the zoo entry's or demo model's own, else per data set: CIFAR 8/255, ImageNet 4/255; asked for "
                "only where it is used")
#: ε where it is only the attacks' budget (attack, defend-eval, analyze shift): σ is the mask's, or there is none
Eps = Annotated[Optional[str], typer.Option("--eps", metavar="EPS", help="attack budget (l-inf, or l2 with --threat-model L2), e.g. 8/255 or 0.0314 (default: " + _EPS_DEFAULT + ")")]
#: ε where it also sets the smoothing noise σ = ε/2 (calibrate-k, pipeline, analyze ablation and sweep)
EpsSigma = Annotated[Optional[str], typer.Option("--eps", metavar="EPS", help="attack budget (l-inf, or l2 with --threat-model L2), e.g. 8/255 or 0.0314; also sets the smoothing noise σ = ε/2 (the default of --sigma where the command has one; default: " + _EPS_DEFAULT + ")")]
Steps = Annotated[Optional[int], typer.Option("--steps", metavar="N", min=1, help="attack iterations (default: the paper's: APGD 100, PGD 20, AutoAttack's APGD/FAB 100)")]
Restarts = Annotated[Optional[int], typer.Option("--restarts", metavar="N", min=1, help="random restarts (default: the paper's: APGD 1, APGD-T-DLR 3)")]
Queries = Annotated[Optional[int], typer.Option("--queries", metavar="N", min=1, help="query budget (default: the paper's: RayS 10000, Square 5000)")]
EotIter = Annotated[Optional[int], typer.Option("--eot-iter", metavar="N", min=1, help="EoT gradient samples per step (default: the paper's 20)")]
BpdaTemperature = Annotated[Optional[float], typer.Option("--bpda-temperature", metavar="T", help="the adaptive attack (beyond the paper, docs/adaptive.md): temperature T >= 1 of the pseudo-label's relaxed backward softmax(f(x+v)/T) (default 1, chosen on held-out images)")]
Shard = Annotated[Optional[str], typer.Option("--shard", metavar="I/N", help="work only on block I of N of the images (I/N, 0-based), for igd merge")]
Draws = Annotated[int, typer.Option("--draws", metavar="R", min=1, help="randomized defence: classifications per point for the "
                                    "selection, and as many fresh ones for the score (Croce et al.); a "
                                    "deterministic model is scored once")]
_DRAWS_HELP = "draws (repeated draws, per-image selection, mean ± std: the default, Croce et al.)"
_SINGLE_HELP = ("single-draw (one draw per set, AND over sets: igd's scoring before repeated draws, to reproduce "
                "earlier numbers)")
ProtocolOpt = Annotated[str, typer.Option("--protocol", metavar="draws|draws-margin|single-draw", help=f"{_DRAWS_HELP}, "
                                          "draws-margin (the same, with ties in the selection going to the lowest "
                                          f"mean margin instead of the first candidate scored) or {_SINGLE_HELP}")]
#: igd audit and igd analyze score by the selection counts alone
CountsProtocolOpt = Annotated[str, typer.Option("--protocol", metavar="draws|single-draw",
                                                help=f"{_DRAWS_HELP} or {_SINGLE_HELP}")]
#: calibrate-k runs no attack: ε only sets σ
CalibrationEps = Annotated[Optional[str], typer.Option("--eps", metavar="EPS", help="the threat model's ε, e.g. 8/255 or 0.0314: sets the smoothing noise σ = ε/2 when --sigma is not given (no attack runs here; default: " + _EPS_DEFAULT + ")")]
#: the audit is ℓ∞ only
AuditEps = Annotated[Optional[str], typer.Option("--eps", metavar="EPS", help="l-inf attack budget, e.g. 8/255 or 0.0314: the audit is l-inf only (RayS, PGD, FGSM and check 6's loss surface are l-inf attacks); σ is the mask's (default: " + _EPS_DEFAULT + ")")]
PresetSteps = Annotated[Optional[int], typer.Option("--steps", metavar="N", min=1, help="attack iterations (default: the --preset's: quick 20, paper APGD 100)")]
PresetRestarts = Annotated[Optional[int], typer.Option("--restarts", metavar="N", min=1, help="random restarts (default: the --preset's: quick 1, paper APGD 1 / APGD-T-DLR 3)")]
PresetQueries = Annotated[Optional[int], typer.Option("--queries", metavar="N", min=1, help="RayS/Square queries (default: the --preset's: quick 1000, paper 10000/5000)")]
PresetEotIter = Annotated[Optional[int], typer.Option("--eot-iter", metavar="N", min=1, help="EoT samples per step (default: the --preset's: quick 5, paper 20)")]
#: the method's settings (METHOD.md steps 2-3), for the commands that make or evaluate a mask
Sigma = Annotated[Optional[float], typer.Option("--sigma", metavar="S", min=0, help="smoothing noise std of the pseudo-label's pass (default ε/2)")]
NSmooth = Annotated[int, typer.Option("--n-smooth", metavar="N", min=1, help="noise samples for the soft pseudo-label")]
Tau = Annotated[float, typer.Option("--tau", metavar="T", help="softmax temperature of the soft pseudo-label")]
