"""Random importance (METHOD.md step 1c): the ablation baseline ("Random-50" in the paper's Table 6).

``I`` is drawn i.i.d. uniform on [0, 1) with a CPU ``torch.Generator`` seeded by ``seed``, for the full (N, C)
matrix, and a shard keeps its rows: the same seed gives the same matrix on any device and for any sharding.
"""

from __future__ import annotations

import torch

from ..errors import IgdError

DISTRIBUTION = "uniform[0,1) i.i.d., torch.Generator(cpu).manual_seed(seed), full (N, C) matrix then rows"


def random_importance(n_neurons: int, num_classes: int, seed: int = 0,
                      neurons: tuple[int, int] | None = None) -> torch.Tensor:
    """Rows ``neurons`` (default all) of a seeded uniform random (N, C) importance matrix, float32."""
    a, b = (0, n_neurons) if neurons is None else neurons
    if not 0 <= a < b <= n_neurons:
        raise IgdError(f"--neurons {a}:{b}: need 0 <= A < B <= N = {n_neurons}")
    g = torch.Generator(device="cpu").manual_seed(int(seed))
    full = torch.rand(n_neurons, num_classes, generator=g, dtype=torch.float32)
    return full[a:b].contiguous()
