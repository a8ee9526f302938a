"""Per-image smoothing noise: a counter-based Gaussian generator keyed by the image's content.

IG-Defense's first pass draws ``v ~ N(0, σ²I)``. With one ``torch.Generator`` for the whole batch, the noise an
image gets depends on where it sits in the batch and on how many draws came before, so evaluating an image in
another batch (another batch size, a shard, the survivors of IW-WC skipping) gives it other noise and possibly
another prediction. Here the noise of a row is a pure function of ``(seed, the row's bytes, k)``, where ``k``
counts the earlier rows with the same bytes since the stream was restarted: the first evaluation of an image
always gets the same noise, and repeated queries of one point (EoT samples, one after another or tiled in one
batch) get fresh noise, as an attacker of a randomized defence expects. Like Philox (JAX's ``random.fold_in``),
the generator is a hash of a key and a counter, computed with vectorized integer ops on the input's device.

Why not torch's generators: they cannot be seeded per row in one call; one generator per row costs a kernel
launch per image and forward on a GPU. The integer ops keep every product below 2**63 (32-bit values times
31-bit constants), so no signed overflow is involved.
"""

from __future__ import annotations

import contextlib
import math
from functools import lru_cache
from typing import Iterator

import torch

M32 = 0xFFFFFFFF
_MUL = 0x45D9F3B  # a well-tested 32-bit avalanche multiplier (< 2**31)
_CHUNK = 1 << 24  # elements per int64 temporary when hashing large inputs
#: rows the stream remembers before it forgets them all (a long-lived defence serving distinct images must not
#: grow without bound; an attack batch — RayS: 10,000 queries x 256 images — stays well below)
MAX_SEEN = 1 << 22


def mix32(h: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer avalanche hash, elementwise on int64 tensors holding values in [0, 2**32)."""
    h = h ^ (h >> 16)
    h = (h * _MUL) & M32
    h = h ^ (h >> 16)
    h = (h * _MUL) & M32
    return h ^ (h >> 16)


@lru_cache(maxsize=4096)
def mix_int(v: int) -> int:
    """:func:`mix32` of one Python int (the low 32 bits of ``v``); cached: every query hashes its seed with it."""
    return int(mix32(torch.tensor([v & M32], dtype=torch.int64))[0])


@lru_cache(maxsize=16)
def _table(n: int, salt: int, device: torch.device) -> torch.Tensor:
    """``n`` pseudo-random 32-bit values (index j hashed with ``salt``), cached per size and device."""
    j = torch.arange(n, dtype=torch.int64, device=device)
    return mix32(mix32(j ^ salt) ^ mix_int(salt + 0x27D4EB2F))


def content_hash(x: torch.Tensor) -> torch.Tensor:
    """A 63-bit hash of every row's bytes (as float32), shape (B,) int64; equal rows give equal hashes.

    Integer sums are exact and independent of reduction order, so the hash does not depend on the device's
    kernels or on the other rows of the batch.
    """
    b = x.shape[0]
    flat = x.detach().to(torch.float32).reshape(b, -1).contiguous()
    d = flat.shape[1]
    w1 = _table(d, 0x3C6EF372, flat.device) >> 1  # 31-bit weights: products stay below 2**63
    w2 = _table(d, 0x1B873593, flat.device) >> 1
    s1 = torch.zeros(b, dtype=torch.int64, device=flat.device)
    s2 = torch.zeros_like(s1)
    step = max(1, _CHUNK // max(d, 1))
    for i in range(0, b, step):
        v = flat[i:i + step].view(torch.int32).to(torch.int64) & M32
        s1[i:i + step] = ((v * w1) & M32).sum(1)
        s2[i:i + step] = ((v * w2) & M32).sum(1)
    h1 = mix32((s1 & M32) ^ mix32(s1 >> 32))
    h2 = mix32((s2 & M32) ^ mix32((s2 >> 32) ^ 0x68E31DA4))
    return ((h1 & 0x7FFFFFFF) << 32) | h2


def row_keys(hashes: torch.Tensor, counts: torch.Tensor, seed: int, draws: int) -> torch.Tensor:
    """32-bit keys of shape (draws, B): one per noise draw ``i`` of every row, from its hash and count."""
    s = mix_int(seed) ^ mix_int((seed >> 32) + 0x165667B1)
    i = torch.arange(draws, dtype=torch.int64, device=hashes.device)[:, None]
    c = (counts.to(hashes.device)[None, :] * draws + i) & M32
    k = mix32(c ^ s)
    k = mix32(k ^ (hashes >> 32)[None, :])
    return mix32(k ^ (hashes & M32)[None, :])


def gaussian(keys: torch.Tensor, shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Standard normal samples of shape (*keys.shape, *shape), a pure function of each key (Box–Muller on two
    hashed uniforms per pair of outputs)."""
    d = int(math.prod(shape))
    half = (d + 1) // 2
    k = keys.reshape(-1, 1)
    u1 = mix32(_table(half, 0x2545F491, keys.device)[None, :] ^ k)
    u2 = mix32(_table(half, 0x9E3779B9 & M32, keys.device)[None, :] ^ k)
    # 24-bit uniforms in (0, 1): the radius never sees log(0)
    f1 = (u1 >> 8).to(torch.float32).add_(0.5).mul_(2.0 ** -24)
    f2 = (u2 >> 8).to(torch.float32).mul_(2.0 ** -24 * 2 * math.pi)
    r = torch.sqrt(-2.0 * torch.log(f1))
    z = torch.cat([r * torch.cos(f2), r * torch.sin(f2)], dim=1)[:, :d]
    return z.to(dtype).reshape(*keys.shape, *shape)


class ContentNoise:
    """The noise stream of one defence: ``sample(x, n)`` gives (n, *x.shape) standard normals per row of ``x``.

    ``restart(seed)`` forgets the rows seen so far. Every row's ``k`` (its earlier occurrences since the
    restart) is kept in a dict of hashes, so a long attack should restart per batch (``run_attack`` does); past
    ``MAX_SEEN`` rows the dict is cleared.
    """

    #: every query gets a fresh draw (:class:`FixedNoise` is the frozen counterpart)
    fresh = True

    def __init__(self, seed: int = 0):
        self.seed = int(seed)
        self.seen: dict[int, int] = {}
        #: per-row keys of the attacked images the next queries are made for (see :meth:`owned`), or None
        self.owners: torch.Tensor | None = None

    @contextlib.contextmanager
    def owned(self, owners: torch.Tensor) -> Iterator[None]:
        """Inside, row i of every query is made for the attacked image ``owners[i]`` (an int64 key, e.g. its
        position): its noise is a function of (seed, owner, bytes, occurrence), so identical queries made for
        different images (RayS's box corners) draw each image's own noise, whatever batch they are in."""
        before, self.owners = self.owners, owners.to(torch.int64).flatten()
        try:
            yield
        finally:
            self.owners = before

    def restart(self, seed: int | None = None) -> None:
        if seed is not None:
            self.seed = int(seed)
        self.seen = {}

    def state(self, x: torch.Tensor | None = None) -> tuple[int, dict[int, int]]:
        """What replays the next draws: the whole stream, or (cheaper) only what the rows of ``x`` need."""
        if x is None:
            return self.seed, dict(self.seen)
        return self.seed, {h: self.seen[h] for h in content_hash(x).tolist() if h in self.seen}

    def set_state(self, state: tuple[int, dict[int, int]]) -> None:
        self.seed, self.seen = state[0], dict(state[1])

    def counts(self, hashes: torch.Tensor) -> torch.Tensor:
        """Each row's number of earlier occurrences (rows before it in this batch included); records the rows."""
        out = []
        if len(self.seen) > MAX_SEEN:
            self.seen = {}  # forgetting only lets a point queried again much later repeat its first draw
        seen = self.seen
        for h in hashes.tolist():
            c = seen.get(h, 0)
            out.append(c)
            seen[h] = c + 1
        return torch.tensor(out, dtype=torch.int64)

    def _hashes(self, x: torch.Tensor) -> torch.Tensor:
        """The rows' keys: their content hashes, combined with their owners inside :meth:`owned`."""
        hashes = content_hash(x)
        if self.owners is not None:
            if len(self.owners) != len(hashes):
                raise ValueError(f"{len(self.owners)} query owners for {len(hashes)} rows")
            o = self.owners.to(hashes.device)
            own = mix32(mix32(o & M32) ^ mix32((o >> 32) ^ 0x3243F6A8))
            hashes = hashes ^ (own << 31)  # both below 2**63
        return hashes

    def sample(self, x: torch.Tensor, draws: int) -> torch.Tensor:
        hashes = self._hashes(x)
        keys = row_keys(hashes, self.counts(hashes), self.seed, draws)
        return gaussian(keys, tuple(x.shape[1:]), dtype=x.dtype)

    def skip(self, x: torch.Tensor, queries: int) -> None:
        """Advance the stream as ``queries`` queries of the batch ``x`` would, without drawing their noise: the
        next query of any row then gets exactly the draw it would have got after them."""
        hashes = self._hashes(x)
        for _ in range(int(queries)):
            self.counts(hashes)


class FixedNoise:
    """Noise frozen to one draw: ``sample(x, n)`` gives the same n standard-normal tensors (of a row's shape) for
    every row and every query, a function of the seed given at construction alone. A defence with it is one
    deterministic, differentiable function — Croce et al.'s check that a gain exists without fresh randomness.
    ``restart(seed)`` and ``set_state`` change nothing: the attack stream's reseed and the scorer's reseed must
    see the same frozen model (else the frozen figure is a transfer between two draws).

    Example::

        noise = FixedNoise(0)
        z = noise.sample(x, 1)
        noise.restart(7)
        assert torch.equal(z, noise.sample(x.flip(0), 1))
    """

    fresh = False

    def __init__(self, seed: int = 0):
        self.seed = int(seed)

    def restart(self, seed: int | None = None) -> None:
        """Nothing to restart: the frozen draw depends on the construction seed only (``seed`` is ignored)."""

    def state(self, x: torch.Tensor | None = None) -> tuple[int, dict[int, int]]:
        return self.seed, {}

    def set_state(self, state: tuple[int, dict[int, int]]) -> None:
        """Nothing to replay: every query gets the frozen draw."""

    def skip(self, x: torch.Tensor, queries: int) -> None:
        """Nothing to advance: every query gets the frozen draw."""

    def sample(self, x: torch.Tensor, draws: int) -> torch.Tensor:
        keys = row_keys(torch.zeros(1, dtype=torch.int64, device=x.device), torch.zeros(1, dtype=torch.int64),
                        self.seed, draws)  # (draws, 1): one key per draw, the same for every row
        z = gaussian(keys, tuple(x.shape[1:]), dtype=x.dtype)  # (draws, 1, *row)
        return z.expand(draws, x.shape[0], *x.shape[1:]).clone()
