"""Smoothing noise keyed by what an image is and what is asked of it, never by the bytes of a queried point.

IG-Defense's first pass draws ``v ~ N(0, σ²I)`` at every query. Every draw here is a pure function of

    (stream, the image's identity, the ordinal of the query for that image, the draw's number within the query)

- the *image's identity* (:func:`image_keys`) is its position in the split mixed with a digest of its clean
  content: fixed before any arithmetic runs, so a point an attack computes a last bit differently (another batch
  size, TF32, another kernel) moves by that last bit and keeps its noise; two byte-identical images of a data set
  have different positions and get their own draws;
- the *stream* names who asks (:func:`stream`: the evaluation's scoring, an attack by name, calibrate-k, ...)
  and the run's seed, so an attack's lucky draw is never replayed when its point is scored;
- the *ordinal* counts the image's earlier queries inside the current :func:`images` block: the r-th
  classification of an image in scoring, the t-th query an attack makes for it. An image's sequence of queries
  does not depend on the other images of its batch (igd's attacks draw their randomness per image), so neither
  do its draws.

Whoever queries a randomized model declares which images the rows of each query belong to: :func:`images`
opens a block for a batch of images (``Attack.__call__``, :func:`igd_cli.scoring.classify`, calibrate-k and the
audit do), and :func:`rows` narrows it when an attack queries a subset (the images it still attacks). A query
whose row count does not match the declared rows is an error, so an undeclared subset cannot pass silently.

Outside any block (the defended model used as a plain ``nn.Module``) a defence falls back to a per-model stream:
draw ``i`` of row ``r`` of the model's ``t``-th call since ``reseed(seed)`` — fresh at every call and repeatable
for the same sequence of calls, but dependent on how the calls are batched. :data:`STRICT` turns that fallback
into an error (the test suite sets it, so every igd code path must declare its images).

The generator is counter-based (a hash of key and counter, like Philox or JAX's ``random.fold_in``) in vectorized
int64 arithmetic on the input's device: torch's generators cannot be keyed per row in one call, and one
generator per row costs a kernel launch per image and query on a GPU. No draw moves anything to the host, and no
record grows with the number of queries (the ordinals are one int64 per image of the block).
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
from contextvars import ContextVar
from dataclasses import dataclass
from functools import lru_cache
from typing import Iterator

import torch

M32 = 0xFFFFFFFF
_MUL = 0x45D9F3B  # a well-tested 32-bit avalanche multiplier (< 2**31): products of 32-bit values stay < 2**63
_CHUNK = 1 << 24  # elements per int64 temporary when hashing large inputs

#: a randomized model queried outside an :func:`images` block raises instead of using its fallback stream
#: (``IGD_NOISE_STRICT=1``; the test suite sets it so that every igd code path declares its images)
STRICT = os.environ.get("IGD_NOISE_STRICT", "") not in ("", "0")


class UndeclaredQuery(RuntimeError):
    """A randomized model was queried in a way the noise cannot attribute to images (see the module doc)."""


# --- integer hashing --------------------------------------------------------------------------------------

def mix32(h: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer avalanche hash, elementwise on int64 tensors holding values in [0, 2**32)."""
    h = h ^ (h >> 16)
    h = (h * _MUL) & M32
    h = h ^ (h >> 16)
    h = (h * _MUL) & M32
    return h ^ (h >> 16)


@lru_cache(maxsize=4096)
def mix_int(v: int) -> int:
    """:func:`mix32` of one Python int (its low 32 bits), computed in Python: no tensor, no device."""
    h = v & M32
    h ^= h >> 16
    h = (h * _MUL) & M32
    h ^= h >> 16
    h = (h * _MUL) & M32
    return h ^ (h >> 16)


def mix63(hi: torch.Tensor, lo: torch.Tensor) -> torch.Tensor:
    """A 63-bit key (int64 >= 0) from two tensors of 32-bit values."""
    a = mix32(hi ^ mix32(lo ^ 0x3243F6A8))
    b = mix32(lo ^ mix32(a ^ 0x13198A2E))
    return ((a & 0x7FFFFFFF) << 32) | b


@lru_cache(maxsize=16)
def _table(n: int, salt: int, device: torch.device) -> torch.Tensor:
    """``n`` pseudo-random 32-bit values (index j hashed with ``salt``), cached per size and device."""
    j = torch.arange(n, dtype=torch.int64, device=device)
    return mix32(mix32(j ^ salt) ^ mix_int(salt + 0x27D4EB2F))


def content_hash(x: torch.Tensor) -> torch.Tensor:
    """A 63-bit digest of every row's values (as float32 bytes), shape (B,) int64; equal rows give equal digests.

    Integer sums are exact and independent of reduction order, so the digest does not depend on the device's
    kernels or on the other rows of the batch. Used once per image, on its clean content (:func:`image_keys`).
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


def image_keys(positions: torch.Tensor | None, x_clean: torch.Tensor) -> torch.Tensor:
    """The identity of each image (B,) int64 on ``x_clean``'s device: its position in the split (default 0..B-1)
    mixed with the digest of its clean content. Two images of one data set never share a key (positions
    differ); the same position of another data set gets another key (content differs)."""
    content = content_hash(x_clean)
    if positions is None:
        positions = torch.arange(len(x_clean))
    p = torch.as_tensor(positions).to(device=content.device, dtype=torch.int64).flatten()
    if len(p) != len(content):
        raise ValueError(f"{len(p)} positions for {len(content)} images")
    return mix63(content >> 32, content & M32) ^ mix63(p >> 32, (p & M32) ^ 0x6A09E667)


def stream(seed: int, name: str) -> int:
    """The 64-bit stream of ``name`` ("score", "attack:apgd-eot", "calibrate", ...) under the run's ``seed``: a
    hash of both, the same in every process (unlike Python's ``hash`` of a string)."""
    digest = hashlib.blake2b(f"{int(seed)}/{name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


# --- draws ------------------------------------------------------------------------------------------------

def draw_keys(stream_id: int, keys: torch.Tensor, ordinals: torch.Tensor, draws: int) -> torch.Tensor:
    """32-bit keys (draws, R): draw ``i`` of the query with ordinal ``ordinals[r]`` of image ``keys[r]``."""
    s_lo, s_hi = mix_int(stream_id), mix_int((stream_id >> 32) ^ 0x165667B1)
    i = torch.arange(draws, dtype=torch.int64, device=keys.device)[:, None]
    c = (ordinals.to(keys.device)[None, :] * draws + i) & M32
    k = mix32(c ^ s_lo)
    k = mix32(k ^ (keys >> 32)[None, :] ^ s_hi)
    return mix32(k ^ (keys & M32)[None, :])


def gaussian(keys: torch.Tensor, shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Standard normal samples of shape (*keys.shape, *shape), a pure function of each key (Box–Muller on two
    hashed uniforms per pair of outputs), computed in float32 and cast to ``dtype``."""
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


@dataclass
class _Block:
    """An :func:`images` block: the images' keys and query ordinals (on their device) and the current rows."""

    stream: int
    keys: torch.Tensor  # (B,) int64
    counts: torch.Tensor  # (B,) int64: queries made for each image so far in this block
    rows: torch.Tensor | None = None  # the block's images the rows of a query belong to (None: all, in order)

    def n_rows(self) -> int:
        return len(self.keys) if self.rows is None else len(self.rows)


_BLOCK: ContextVar[_Block | None] = ContextVar("igd_noise_block", default=None)


@contextlib.contextmanager
def images(keys: torch.Tensor, stream_id: int) -> Iterator[None]:
    """Inside, the rows of every query are the images with identities ``keys`` (:func:`image_keys`), in order,
    and draws come from ``stream_id`` (:func:`stream`); every image's ordinal starts at 0. Blocks nest: an inner
    block shadows the outer one until it ends.

    Example::

        with noise.images(noise.image_keys(index, x), noise.stream(seed, "score")):
            first, second = defense(x), defense(x)   # every image's queries 0 and 1: fresh, batch-independent
    """
    keys = keys.to(torch.int64).flatten()
    token = _BLOCK.set(_Block(int(stream_id), keys, torch.zeros_like(keys)))
    try:
        yield
    finally:
        _BLOCK.reset(token)


@contextlib.contextmanager
def rows(idx: torch.Tensor | list[int]) -> Iterator[None]:
    """Inside, the rows of every query are the images ``idx`` (indices into the current rows: nested calls
    compose) — an attack querying the subset of images it still attacks. A no-op outside an :func:`images`
    block."""
    block = _BLOCK.get()
    if block is None:
        yield
        return
    idx = torch.as_tensor(idx, dtype=torch.int64, device=block.keys.device).flatten()
    before = block.rows
    block.rows = idx if before is None else before[idx]
    try:
        yield
    finally:
        block.rows = before


def current_keys() -> torch.Tensor | None:
    """The identities of the current rows (None outside a block): what a nested block for the same images uses."""
    block = _BLOCK.get()
    if block is None:
        return None
    return block.keys if block.rows is None else block.keys[block.rows]


def _ordinals(block: _Block, n: int, queries: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The keys and ordinals of a query of ``n`` rows in ``block``, and advances the ordinals by ``queries``."""
    if n != block.n_rows():
        raise UndeclaredQuery(
            f"a randomized model was queried with {n} rows where {block.n_rows()} images are declared: wrap a "
            "query of a subset of the images in igd_cli.noise.rows(indices)")
    if block.rows is None:
        ordinals = block.counts.clone()
        block.counts += queries
        return block.keys, ordinals
    r = block.rows
    # a row listed twice in one query is two queries of its image: its k-th listing gets ordinal + k
    order = torch.argsort(r, stable=True)
    srt = r[order]
    first = torch.searchsorted(srt, srt)
    rank = torch.empty_like(r)
    rank[order] = torch.arange(len(r), device=r.device) - first
    ordinals = block.counts[r] + rank * queries
    block.counts.index_add_(0, r, torch.full_like(r, queries))
    return block.keys[r], ordinals


class FreshNoise:
    """The noise of a randomized model: fresh at every query, keyed as the module doc says.

    ``sample(x, n)`` gives (n, *x.shape) standard normals for the rows of ``x`` (one query: every row's ordinal
    advances by one); ``skip(x, q)`` advances as ``q`` queries would, drawing nothing; ``restart(seed)`` restarts
    the fallback stream used outside a block.
    """

    #: every query gets a fresh draw (:class:`FixedNoise` is the frozen counterpart)
    fresh = True

    def __init__(self, seed: int = 0):
        self.seed = int(seed)
        self.calls = 0  # fallback: calls since restart

    def restart(self, seed: int | None = None) -> None:
        if seed is not None:
            self.seed = int(seed)
        self.calls = 0

    def sample(self, x: torch.Tensor, draws: int) -> torch.Tensor:
        block = _BLOCK.get()
        if block is None:
            if STRICT:
                raise UndeclaredQuery("a randomized model was queried outside an igd_cli.noise.images block")
            keys = torch.arange(x.shape[0], dtype=torch.int64, device=x.device)
            ordinals = torch.full_like(keys, self.calls)
            self.calls += 1
            k = draw_keys(stream(self.seed, "fallback"), keys, ordinals, draws)
        else:
            keys, ordinals = _ordinals(block, x.shape[0], 1)
            k = draw_keys(block.stream, keys.to(x.device), ordinals.to(x.device), draws)
        return gaussian(k, tuple(x.shape[1:]), dtype=x.dtype)

    def skip(self, x: torch.Tensor, queries: int) -> None:
        if queries <= 0:
            return
        block = _BLOCK.get()
        if block is None:
            self.calls += int(queries)
        else:
            _ordinals(block, x.shape[0], int(queries))


class FixedNoise:
    """Noise frozen to one draw: ``sample(x, n)`` gives the same n standard-normal tensors (of a row's shape) for
    every row and every query, a function of the seed given at construction alone. A defence with it is one
    deterministic, differentiable function — Croce et al.'s check that a gain exists without fresh randomness.
    ``restart(seed)`` changes nothing: the attack's and the scorer's model must be the same frozen model (else
    the frozen figure is a transfer between two draws).

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

    def skip(self, x: torch.Tensor, queries: int) -> None:
        """Nothing to advance: every query gets the frozen draw."""

    def sample(self, x: torch.Tensor, draws: int) -> torch.Tensor:
        zero = torch.zeros(1, dtype=torch.int64, device=x.device)
        keys = draw_keys(stream(self.seed, "frozen"), zero, zero, draws)  # (draws, 1): the same for every row
        z = gaussian(keys, tuple(x.shape[1:]), dtype=x.dtype)  # (draws, 1, *row)
        return z.expand(draws, x.shape[0], *x.shape[1:]).clone()


# --- a defence igd does not own (igd_cli.contract) ------------------------------------------------------

@dataclass
class _Query:
    """One query of a user's defence (:func:`query`): its rows' image keys and ordinals, the stream, and how
    many draws the defence has made in it so far."""

    stream: int
    keys: torch.Tensor  # (rows,) int64
    ordinals: torch.Tensor  # (rows,) int64
    frozen: bool = False  # every row and query gets the same draws (keys and ordinals are zeros)
    calls: int = 0


_QUERY: ContextVar[_Query | None] = ContextVar("igd_noise_query", default=None)


def _call_stream(stream_id: int, call: int) -> int:
    """The stream of a query's ``call``-th draw: the query's own for the first (so a defence's one draw is the
    draw IG-Defense's first pass makes with ``n_s = 1``), a derived one for each later draw."""
    if call == 0:
        return stream_id
    return (stream_id ^ (mix_int(call ^ 0x2F0B3A49) << 32) ^ mix_int(call + 0x7A3D1E55)) & ((1 << 64) - 1)


def _torch_seed(q: _Query) -> int:
    """A 63-bit seed for torch's default generator from the query's stream, rows' keys and ordinals (in row
    order: one device-to-host copy)."""
    h = hashlib.blake2b(int(q.stream).to_bytes(8, "little"), digest_size=8)
    h.update(torch.stack([q.keys, q.ordinals]).cpu().numpy().tobytes())
    return int.from_bytes(h.digest(), "little") & ((1 << 63) - 1)


@contextlib.contextmanager
def query(x: torch.Tensor, *, frozen: int | None = None) -> Iterator[None]:
    """One query of a defence that is not igd's own (:mod:`igd_cli.contract` wraps every call of its forward,
    ``surrogate`` and ``first_pass`` in this): each row's ordinal in the current :func:`images` block advances by
    one, as one forward of IG-Defense does. Inside, :func:`normal_like` and :func:`uniform_like` draw keyed by
    (stream, image, ordinal, the draw's number in the query), and torch's default generator is seeded from the
    stream, the rows' images and their ordinals (restored afterwards). ``frozen`` (a seed): every row of every
    query gets the same draws, a function of that seed alone, and no ordinal moves (the audit's frozen-noise
    copy). Outside a block nothing is keyed: the defence draws from torch's generator as it is."""
    block = _BLOCK.get()
    if frozen is not None:
        zero = torch.zeros(x.shape[0], dtype=torch.int64, device=x.device)
        q = _Query(stream(frozen, "frozen"), zero, zero, frozen=True)
    elif block is None:
        yield
        return
    else:
        keys, ordinals = _ordinals(block, x.shape[0], 1)
        q = _Query(block.stream, keys, ordinals)
    token = _QUERY.set(q)
    try:
        with torch.random.fork_rng(devices=[x.device] if x.is_cuda else []):
            torch.manual_seed(_torch_seed(q))
            yield
    finally:
        _QUERY.reset(token)


def skip(x: torch.Tensor, queries: int) -> None:
    """Advance the rows of ``x`` in the current block as ``queries`` queries would (nothing outside a block)."""
    block = _BLOCK.get()
    if block is not None and queries > 0:
        _ordinals(block, x.shape[0], int(queries))


def _query_keys(x: torch.Tensor, what: str) -> torch.Tensor | None:
    """The keys (rows,) of the next draw of the current query for a tensor ``x`` of one row per image (None
    outside a query: draw from torch's generator)."""
    q = _QUERY.get()
    if q is None:
        if STRICT and _BLOCK.get() is not None:
            raise UndeclaredQuery(f"igd_cli.noise.{what} called inside an image block but outside a query of the "
                                  "defence (igd_cli.noise.query)")
        return None
    if x.shape[0] != len(q.keys):
        raise UndeclaredQuery(f"igd_cli.noise.{what}(x): x has {x.shape[0]} rows but the query has {len(q.keys)} "
                              "images: give it a tensor with one row per image of the query (e.g. x itself)")
    call, q.calls = q.calls, q.calls + 1
    return draw_keys(_call_stream(q.stream, call), q.keys.to(x.device), q.ordinals.to(x.device), 1)[0]


def normal_like(x: torch.Tensor) -> torch.Tensor:
    """Standard normals shaped like ``x`` (one row per image of the query), for a defence's own randomness:
    inside igd's evaluation a pure function of (stream, image, the query's ordinal, this draw's number in the
    query) — fresh at every query, the same in any batch, shard or order, as IG-Defense's noise; the first draw
    of a query is the draw smoothing with ``n_s = 1`` makes. Outside it, ``torch.randn_like(x)``.

    Example::

        def forward(self, x):
            return self.model(x + 0.25 * igd_cli.noise.normal_like(x))
    """
    keys = _query_keys(x, "normal_like")
    if keys is None:
        return torch.randn_like(x)
    return gaussian(keys, tuple(x.shape[1:]), dtype=x.dtype if x.is_floating_point() else torch.float32)


def uniform_like(x: torch.Tensor) -> torch.Tensor:
    """Uniforms in [0, 1) shaped like ``x`` (one row per image of the query), keyed as :func:`normal_like`'s
    (24-bit resolution); outside igd's evaluation ``torch.rand_like(x)``.

    Example::

        u = igd_cli.noise.uniform_like(x.new_empty(len(x), 3))   # three uniforms per image
    """
    keys = _query_keys(x, "uniform_like")
    dtype = x.dtype if x.is_floating_point() else torch.float32
    if keys is None:
        return torch.rand(x.shape, dtype=dtype, device=x.device)
    d = int(math.prod(x.shape[1:]))
    u = mix32(_table(max(d, 1), 0x5BD1E995, keys.device)[None, :] ^ keys.reshape(-1, 1))
    return (u >> 8).to(torch.float32).mul_(2.0 ** -24)[:, :d].to(dtype).reshape(x.shape)
