"""Counter-based random numbers: pure functions of integer keys, evaluated with torch ops on any device.

A number is `hash(key, counter)`, so what one image draws depends only on its own key (for example the
run's seed, the image's index and the step) and never on which other images share its batch, how big the
batch is, or which device computes it: the encoder's fit and the loader's augmentation use this to make
results independent of how the work is split (shards, batches, several batches per decode).

    keys = rng.row_keys(rng.mix(seed, step), image_indices)   # int64 [B] on the device, one key per row
    u = rng.uniform(keys, (64,), stream=3)                    # float64 [B, 64] in [0, 1)

Values are 32-bit words held in int64 tensors; the hash is Thomas Mueller's 32-bit integer hash (two rounds
of xorshift-multiply), whose multiplier is below 2^27, so no product overflows int64. Not for cryptography.
"""
from __future__ import annotations

import math

import torch

_MASK = 0xFFFFFFFF
_MULTIPLIER = 0x45D9F3B
_GOLDEN = 0x9E3779B9  # 2^32 / golden ratio: spreads consecutive counters before hashing


def _hash_int(x: int) -> int:
    """The hash of one 32-bit word (host ints), bit-identical to `hash32`."""
    x &= _MASK
    x = ((x >> 16) ^ x) * _MULTIPLIER & _MASK
    x = ((x >> 16) ^ x) * _MULTIPLIER & _MASK
    return (x >> 16) ^ x


def hash32(x: torch.Tensor) -> torch.Tensor:
    """Hash every 32-bit word of an int64 tensor (values in [0, 2^32)) to a 32-bit word."""
    x = torch.bitwise_xor(x >> 16, x).mul_(_MULTIPLIER).bitwise_and_(_MASK)
    x = torch.bitwise_xor(x >> 16, x).mul_(_MULTIPLIER).bitwise_and_(_MASK)
    return torch.bitwise_xor(x >> 16, x)


def mix(*words: int) -> int:
    """One 32-bit key from any number of Python ints (each reduced to 64 bits, both halves mixed in)."""
    state = 0x2545F491
    for word in words:
        word = int(word) & 0xFFFFFFFFFFFFFFFF
        for half in (word & _MASK, word >> 32):
            state = _hash_int(state ^ _hash_int(half + _GOLDEN))
    return state


def row_keys(key: int, rows: torch.Tensor) -> torch.Tensor:
    """int64 [*rows.shape] keys, one per row id (e.g. an image index, any int in [0, 2^32)), under `key`."""
    return hash32(torch.bitwise_xor(hash32(rows.to(torch.int64) & _MASK), key & _MASK))


_COUNTERS: dict = {}


def _counters(count: int, stream: int, device) -> torch.Tensor:
    """hash(stream, 0..count-1) as int64 [count] on `device`, cached (the same for every row)."""
    cache_key = (str(device), count, stream)
    t = _COUNTERS.get(cache_key)
    if t is None:
        if len(_COUNTERS) > 256:
            _COUNTERS.clear()
        salt = mix(stream)
        base = torch.arange(count, dtype=torch.int64, device=device).mul_(_GOLDEN).add_(salt).bitwise_and_(_MASK)
        t = _COUNTERS[cache_key] = hash32(base)
    return t


def bits(keys: torch.Tensor, shape: tuple[int, ...], stream: int = 0) -> torch.Tensor:
    """int64 [*keys.shape, *shape] 32-bit random words: word (row r, element e) = hash(keys[r], stream, e)."""
    count = math.prod(shape)
    counters = _counters(count, stream, keys.device).view(*([1] * keys.dim()), *shape)
    return hash32(torch.bitwise_xor(keys.reshape(*keys.shape, *([1] * len(shape))), counters))


def uniform(keys: torch.Tensor, shape: tuple[int, ...], stream: int = 0, dtype=torch.float64) -> torch.Tensor:
    """[*keys.shape, *shape] uniform in [0, 1) (32 random bits for float64, 24 for smaller float dtypes, so
    a value never rounds up to 1)."""
    words = bits(keys, shape, stream)
    if dtype == torch.float64:
        return words.to(torch.float64).mul_(2.0 ** -32)
    return (words >> 8).to(dtype).mul_(2.0 ** -24)
