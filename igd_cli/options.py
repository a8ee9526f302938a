"""Option types shared by every command (the names are the CLI contract in CLI.md)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

Model = Annotated[str, typer.Option("--model", help="demo | RobustBench zoo name | torchvision:NAME | PATH.pt/.pth/.safetensors (with --arch)")]
Arch = Annotated[Optional[str], typer.Option("--arch", help="architecture of a state-dict file: resnet18, preact-resnet18, wrn-34-10, resnet50, demo-cnn, or your own MODULE:CALLABLE or path/to/file.py:CALLABLE")]
Normalize = Annotated[Optional[str], typer.Option("--normalize", help="wrap a state-dict model whose normalisation is not inside it: MEAN,STD per channel (0.5,0.5 or m1,m2,m3,s1,s2,s3) or cifar10, cifar100, imagenet, mnist")]
Dataset = Annotated[Optional[str], typer.Option("--dataset", help="digits | cifar10 | cifar100 | imagenet | PATH.safetensors (default: the model's own)")]
DataDir = Annotated[Optional[Path], typer.Option("--data-dir", envvar="IGD_DATA_DIR", help="where torchvision data sets or ImageNet folders live")]
ZooDataset = Annotated[Optional[str], typer.Option("--zoo-dataset", help="RobustBench zoo name listed under several data sets (cifar10, cifar100, imagenet): which entry to load (default: --dataset if it is one of them, else the one whose checkpoint is in the model dir, else cifar10); --dataset only chooses the images")]
ProbeDataset = Annotated[Optional[str], typer.Option("--probe-dataset", help="ranking images, when not the training split of --dataset: a data set name (its --split) or PATH.safetensors, e.g. the training file beside a test file")]
ThreatModel = Annotated[str, typer.Option("--threat-model", help="Linf or L2")]
Device = Annotated[str, typer.Option("--device", help="auto, cpu, cuda, cuda:N")]
BatchSize = Annotated[int, typer.Option("--batch-size", min=1, help="images per forward pass")]
AutoBatchSize = Annotated[str, typer.Option("--batch-size", help="images per forward pass, or auto: on a CUDA "
                                            "device the largest batch of this stage's workload that fits (binary "
                                            "search on out-of-memory); on a CPU the default")]
Precision = Annotated[str, typer.Option("--precision", help="fp32 | bf16 | fp16: ranking and the defended "
                                        "forward (clean scoring, calibration) under torch.autocast; attacks "
                                        "always run in fp32 (low precision can mask gradients)")]
Seed = Annotated[int, typer.Option("--seed", help="random seed: the same seed gives the same result")]
Json = Annotated[bool, typer.Option("--json", help="print exactly one JSON object, the result, on stdout")]
Layer = Annotated[Optional[str], typer.Option("--layer", help="dotted module name of the masked layer (default: the model's penultimate layer)")]
Eps = Annotated[Optional[str], typer.Option("--eps", help="attack budget (l-inf, or l2 with --threat-model L2), e.g. 8/255 or 0.0314; also sets σ = ε/2 (default: the zoo entry's or demo model's own, else per data set: CIFAR 8/255, ImageNet 4/255; asked for only where smoothing or an attack needs it)")]
Steps = Annotated[Optional[int], typer.Option("--steps", help="attack iterations (default: the paper's: APGD 100, PGD 20, AutoAttack's APGD/FAB 100)")]
Restarts = Annotated[Optional[int], typer.Option("--restarts", help="random restarts (default: the paper's: APGD 1, APGD-T-DLR 3)")]
Queries = Annotated[Optional[int], typer.Option("--queries", help="query budget (default: the paper's: RayS 10000, Square 5000)")]
EotIter = Annotated[Optional[int], typer.Option("--eot-iter", help="EoT gradient samples per step (default: the paper's 20)")]
BpdaTemperature = Annotated[Optional[float], typer.Option("--bpda-temperature", help="the adaptive attack (beyond the paper, docs/adaptive.md): temperature T >= 1 of the pseudo-label's relaxed backward softmax(f(x+v)/T) (default 5, chosen by measurement)")]
Shard = Annotated[Optional[str], typer.Option("--shard", help="work only on block I of N of the images (I/N, 0-based), for igd merge")]
Draws = Annotated[int, typer.Option("--draws", min=1, help="randomized defence: classifications per point for the "
                                    "selection, and as many fresh ones for the score (Croce et al.); a "
                                    "deterministic model is scored once")]
ProtocolOpt = Annotated[str, typer.Option("--protocol", help="draws (repeated draws, per-image selection, mean ± "
                                          "std: the default) or single-draw (one draw per set, AND over sets: "
                                          "igd's scoring before repeated draws, to reproduce earlier numbers)")]
