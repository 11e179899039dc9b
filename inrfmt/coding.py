"""Entropy coding of format 2's integer codes (FORMAT.md part II): the count tables and the rANS messages.

    tables = fit_tables(histograms(codes, grid), grid)   # one table per parameter group, for the whole file
    data = tables_section(tables)                        # the file's `tables` section
    words = encode_chunk(codes, grid, tables)            # one rANS message for a chunk's codes [n, P]
    decode_chunk(words, Decoder(tables, grid), out)      # the inverse, checked

Codes are the stored integers q of every parameter (int16 [n, P], spec.param_groups order). A group with
code width b has unsigned codes u = q + 2^(b-1) in [0, 2^b); its table covers the used ones, symbol
s = u - first. A chunk's symbols, in order (group by group, image by image), are dealt round-robin to
LANES independent rANS streams, so a decoder can follow four state chains at once (twice the speed of one
stream on a CPU). Encoding uses `constriction` (stack.AnsCoder: 32-bit words, 64-bit state, 24-bit
frequencies); decoding is this module's own decoder of the same streams, compiled by numba without the GIL
so that chunks decode in parallel threads. It checks that every lane is exactly used up, so a malformed
message is rejected in time linear in the chunk's codes and words.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from .spec import param_groups

PRECISION = 24
TOTAL = 1 << PRECISION
MAX_ALPHABET = 1 << 16
MAX_COUNT = (1 << 32) - 1
LUT_BITS = 12  # a table's first lookup: the symbol holding each 2^(24-12)-wide slot of quantiles
CODE_DTYPE = np.dtype(np.int16)
WORD_DTYPE = np.dtype("<u4")
LANES = 4  # symbol i of a chunk is coded in lane i % LANES (a power of two: the decoder masks)


class CodingError(ValueError):
    """A malformed table or rANS message (the reader turns it into InrFormatError naming the file)."""


# -- tables -------------------------------------------------------------------------------------------
def normalize_counts(counts) -> np.ndarray:
    """Integer counts c[0..K-1] (K >= 2) -> frequencies f (each >= 1, sum 2^24), integer arithmetic only:
    C = sum(c) (all counts 0: every c = 1); f[s] = 1 + floor(c[s] * (2^24 - K) / C); the first symbol with
    the largest count gets the remainder."""
    c = np.asarray(counts, np.int64)
    if c.sum() == 0:
        c = np.ones(len(c), np.int64)
    total, free = int(c.sum()), TOTAL - len(c)
    f = np.array([1 + (int(x) * free) // total for x in c], np.int64)  # Python ints: exact for any counts
    f[int(np.argmax(c))] += TOTAL - int(f.sum())
    return f


@dataclass(frozen=True)
class CodeTable:
    """One parameter group's table: symbols s = 0..K-1 stand for unsigned codes first + s; `counts` as
    stored, and `freqs` (normalize_counts) that both coders use."""

    first: int
    counts: np.ndarray
    freqs: np.ndarray = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        counts = np.asarray(self.counts, np.int64)
        counts.setflags(write=False)
        object.__setattr__(self, "counts", counts)
        object.__setattr__(self, "freqs", normalize_counts(counts))

    def __eq__(self, other) -> bool:
        return isinstance(other, CodeTable) and self.first == other.first and np.array_equal(self.counts,
                                                                                             other.counts)

    @property
    def size(self) -> int:
        return len(self.counts)


def _uleb128(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _read_uleb128(data: bytes, pos: int) -> tuple[int, int]:
    """(value, next position) of a minimal LEB128 number of at most 5 bytes, < 2^32."""
    value = 0
    for i in range(5):
        if pos >= len(data):
            raise CodingError("truncated LEB128 number")
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << (7 * i)
        if byte < 0x80:
            if i and byte == 0:
                raise CodingError("non-minimal LEB128 number")
            if value > MAX_COUNT:
                raise CodingError(f"LEB128 number {value} is not below 2^32")
            return value, pos
    raise CodingError("LEB128 number longer than 5 bytes")


def tables_section(tables: Sequence[CodeTable]) -> bytes:
    """The `tables` section: per group, LEB128 first, LEB128 K - 2, then K LEB128 counts."""
    out = bytearray()
    for t in tables:
        out += _uleb128(t.first) + _uleb128(t.size - 2)
        for c in t.counts:
            out += _uleb128(int(c))
    return bytes(out)


def parse_tables_section(data: bytes, bits: Sequence[int]) -> list[CodeTable]:
    """The inverse of tables_section, checked: each table within its group's b-bit codes, 2 <= K <= 2^16,
    counts < 2^32, no bytes left over. CodingError("table g: ...") otherwise."""
    tables, pos = [], 0
    for g, b in enumerate(int(b) for b in bits):
        try:
            first, pos = _read_uleb128(data, pos)
            k_minus_2, pos = _read_uleb128(data, pos)
            k = k_minus_2 + 2
            if k > min(MAX_ALPHABET, 1 << b) or first + k > (1 << b):
                raise CodingError(f"symbols {first}..{first + k - 1} exceed the group's {b}-bit codes "
                                  f"(0..{(1 << b) - 1})")
            counts = np.empty(k, np.int64)
            for s in range(k):
                counts[s], pos = _read_uleb128(data, pos)
        except CodingError as e:
            raise CodingError(f"table {g}: {e}") from None
        tables.append(CodeTable(first, counts))
    if pos != len(data):
        raise CodingError(f"{len(data) - pos} bytes after the last table")
    return tables


def _unsigned(codes: np.ndarray, group, bits: int) -> np.ndarray:
    return codes[:, group.offset:group.stop].astype(np.int64).reshape(-1) + (1 << (bits - 1))


def histograms(codes: np.ndarray, grid) -> list[np.ndarray]:
    """Counts of every unsigned code (0..2^b - 1) of each group in codes [n, P] (sum them over chunks)."""
    return [np.bincount(_unsigned(codes, g, int(b)), minlength=1 << int(b)).astype(np.int64)
            for g, b in zip(param_groups(grid.arch), grid.bits)]


def _table_cost_bits(counts: np.ndarray, stored: np.ndarray) -> float:
    """Bits of the stored table plus the ideal code length of `counts` under its frequencies."""
    f = normalize_counts(stored)
    used = counts > 0
    return float(-(counts[used] * np.log2(f[used] / TOTAL)).sum()) + 8 * len(tables_section([CodeTable(0, stored)]))


def fit_tables(hists: Sequence[np.ndarray], grid) -> list[CodeTable]:
    """One table per group from its histogram over the whole file: the span of used codes (at least two
    symbols), with the counts stored exactly or scaled down to fit one or two LEB128 bytes, whichever makes
    table plus coded symbols smallest (small files save table bytes, large ones code length)."""
    tables = []
    for h, b in zip(hists, grid.bits):
        used = np.flatnonzero(h)
        lo, hi = (int(used[0]), int(used[-1])) if len(used) else (0, 1)
        if hi == lo:  # a constant group still needs two symbols
            lo, hi = (lo, lo + 1) if lo + 1 < (1 << int(b)) else (lo - 1, lo)
        counts = np.asarray(h[lo:hi + 1], np.int64)
        best, best_cost = counts, _table_cost_bits(counts, counts)
        top = int(counts.max())
        for cap in (127, 16383):
            if top > cap:
                scaled = np.where(counts > 0, np.maximum(1, (counts * cap + top // 2) // top), 0)
                cost = _table_cost_bits(counts, scaled)
                if cost < best_cost:
                    best, best_cost = scaled, cost
        tables.append(CodeTable(lo, best))
    return tables


# -- encoding (constriction) ----------------------------------------------------------------------------
def _model(table: CodeTable):
    """A constriction model with exactly the table's frequencies: Categorical(p, perfect=False) builds
    cdf[i] = floor((p_0 + ... + p_(i-1)) * (2^24 - K) / sum(p)) + i; with p = f - 1 (float64 integers)
    sum(p) = 2^24 - K, the scale is exactly 1 and cdf[i] is the sum of the f before i."""
    import constriction

    return constriction.stream.model.Categorical((table.freqs - 1).astype(np.float64), perfect=False)


def encode_chunk(codes: np.ndarray, grid, tables: Sequence[CodeTable]) -> bytes:
    """The message of one chunk holding codes [n, P]: LANES u32 word counts, then each lane's rANS words.
    Symbol order: group by group, within a group image by image, each image's group in C order; symbol i
    goes to lane i % LANES. ValueError if a code is outside its group's table."""
    import constriction

    coders = [constriction.stream.stack.AnsCoder() for _ in range(LANES)]
    groups = param_groups(grid.arch)
    start = [0]
    for g in groups:
        start.append(start[-1] + len(codes) * g.size)
    for k in reversed(range(len(groups))):  # a stack: the last group goes in first
        g, b, t = groups[k], int(grid.bits[k]), tables[k]
        s = (_unsigned(codes, g, b) - t.first).astype(np.int32)
        if s.size and (s.min() < 0 or s.max() >= t.size):
            raise ValueError(f"group {g.name}: a code is outside its table")
        model = _model(t)
        for lane, coder in enumerate(coders):
            mine = s[(lane - start[k]) % LANES::LANES]
            if mine.size:
                coder.encode_reverse(mine, model)
    words = [np.asarray(c.get_compressed(), WORD_DTYPE) for c in coders]
    return np.array([len(w) for w in words], WORD_DTYPE).tobytes() + b"".join(w.tobytes() for w in words)


# -- decoding (numba) -----------------------------------------------------------------------------------
@dataclass
class Decoder:
    """What decode_chunk needs of a file's tables, built once per file."""

    cdf: np.ndarray        # uint64: per group K + 1 cumulative frequencies, back to back
    freq: np.ndarray       # uint64: per group K frequencies (+ one unused), aligned with cdf
    cdf_start: np.ndarray  # int64 [G]
    lut: np.ndarray        # int64 [G, 2^LUT_BITS]: the symbol holding the first quantile of each slot
    base: np.ndarray       # int64 [G]: q = symbol + base (first - 2^(b-1))
    offset: np.ndarray     # int64 [G]: the group's first parameter in an image's row
    size: np.ndarray       # int64 [G]: the group's parameters per image
    params: int            # P

    @classmethod
    def build(cls, tables: Sequence[CodeTable], grid) -> "Decoder":
        groups = param_groups(grid.arch)
        cdfs = [np.concatenate([[0], np.cumsum(t.freqs)]).astype(np.int64) for t in tables]
        freqs = [np.concatenate([t.freqs, [0]]).astype(np.uint64) for t in tables]
        starts = np.cumsum([0] + [len(c) for c in cdfs[:-1]]).astype(np.int64)
        slots = np.arange(1 << LUT_BITS, dtype=np.int64) << (PRECISION - LUT_BITS)
        lut = np.stack([np.searchsorted(c, slots, side="right") - 1 for c in cdfs]).astype(np.int64)
        return cls(np.concatenate(cdfs).astype(np.uint64), np.concatenate(freqs), starts, lut,
                   np.array([t.first - (1 << (int(b) - 1)) for t, b in zip(tables, grid.bits)], np.int64),
                   np.array([g.offset for g in groups], np.int64), np.array([g.size for g in groups], np.int64),
                   grid.arch.params_per_image)


_DECODE_PROBLEMS = {1: "a lane ends in a zero word", 2: "words are left in a lane after the last code",
                    3: "a lane's final state is not 0 (a corrupt or mismatched message)"}


def decode_chunk(message: bytes, decoder: Decoder, out: np.ndarray) -> None:
    """Decode one chunk's message into out (int16 [n, P], C-contiguous), checking the lane table and that
    every lane is used up exactly (no words left, final state 0); CodingError otherwise. Releases the GIL."""
    if out.dtype != CODE_DTYPE or not out.flags.c_contiguous or out.ndim != 2 or out.shape[1] != decoder.params:
        raise ValueError("decode_chunk: out must be a C-contiguous int16 [n, P] array")
    if len(message) % 4 or len(message) < 4 * LANES:
        raise CodingError(f"the message is {len(message)} bytes, not {LANES} word counts and whole 4-byte words")
    words = np.frombuffer(message, WORD_DTYPE)
    counts = words[:LANES].astype(np.int64)
    if int(counts.sum()) != len(words) - LANES:
        raise CodingError(f"the lanes' word counts {counts.tolist()} do not add up to the message's "
                          f"{len(words) - LANES} words")
    bounds = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64) + LANES
    rc = _decode_kernel()(words, bounds, out.shape[0], decoder.params, decoder.cdf, decoder.freq,
                          decoder.cdf_start, decoder.lut, decoder.base, decoder.offset, decoder.size,
                          out.reshape(-1))
    if rc:
        raise CodingError(_DECODE_PROBLEMS[rc])


def _decode(words, bounds, n, params, cdf, freq, cdf_start, lut, base, offset, size, out):
    """The rANS decoder (FORMAT.md part II), compiled by numba; returns 0 or a _DECODE_PROBLEMS key.
    Lane l's words are words[bounds[l]:bounds[l + 1]], read as a stack from the end."""
    lanes = bounds.shape[0] - 1
    state = np.zeros(lanes, np.uint64)
    pos = np.zeros(lanes, np.int64)
    for lane in range(lanes):
        lo, p = bounds[lane], bounds[lane + 1]
        if p > lo:
            if words[p - 1] == 0:
                return 1
            p -= 1
            state[lane] = np.uint64(words[p])
            if p > lo:
                p -= 1
                state[lane] = (state[lane] << np.uint64(32)) | np.uint64(words[p])
        pos[lane] = p
    mask = np.uint64(TOTAL - 1)
    low = np.uint64(1) << np.uint64(32)
    precision = np.uint64(PRECISION)
    shift = np.uint64(PRECISION - LUT_BITS)
    i = 0
    for g in range(offset.shape[0]):
        c0 = cdf_start[g]
        q0 = base[g]
        off = offset[g]
        count = size[g]
        lut_g = lut[g]
        for image in range(n):
            row = image * params + off
            for e in range(count):
                lane = i & (LANES - 1)  # consecutive symbols in different lanes: independent chains overlap
                x = state[lane]
                quantile = x & mask
                s = np.int64(lut_g[quantile >> shift])
                while cdf[c0 + s + 1] <= quantile:
                    s += 1
                x = (x >> precision) * freq[c0 + s] + quantile - cdf[c0 + s]
                if x < low and pos[lane] > bounds[lane]:
                    pos[lane] -= 1
                    x = (x << np.uint64(32)) | np.uint64(words[pos[lane]])
                state[lane] = x
                out[row + e] = s + q0
                i += 1
    for lane in range(lanes):
        if pos[lane] != bounds[lane]:
            return 2
        if state[lane] != 0:
            return 3
    return 0


_KERNEL = None


def _decode_kernel():
    """_decode compiled on first use (numba caches it on disk)."""
    global _KERNEL
    if _KERNEL is None:
        from numba import njit

        _KERNEL = njit(cache=True, nogil=True, boundscheck=False)(_decode)
    return _KERNEL
