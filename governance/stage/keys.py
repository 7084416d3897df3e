"""Randomness keyed by sample id: the same sample gets the same draws however the rows are cut.

Every random quantity of the stage is a hash of (seed, sample id, purpose), never a generator
advanced along the rows, so batch sizes, chunking and Spark partitions cannot change a result.

* ``sample_keys``: a 64-bit key per sample. Integer ids (the row's 0-based position in the input,
  or an integer ``id_column``) are their two's-complement bits; any other id (a string) is
  the first 8 bytes (little endian) of BLAKE2b over its UTF-8 text.
* ``hash_keys(keys, seed, purpose)``: SplitMix64's finaliser applied twice to the key XOR a
  per-(seed, purpose) stream constant; uniform 64-bit values.
* Poisson(1) bootstrap weights: replicate ``b`` of a sample takes 16 bits of the SplitMix64
  sequence started at that sample's bootstrap hash (4 replicates per 64-bit word) through a
  65,536-entry inverse-CDF table.
* Stability halves: the top bit of the sample's half hash.
* Reservoir priority: the sample's reservoir hash (bottom-k sampling keeps the k smallest).
"""

from __future__ import annotations

import ctypes
import hashlib
import math
import sys
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..backtrace import native

MASK64 = (1 << 64) - 1
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_C1 = np.uint64(0xBF58476D1CE4E5B9)
_C2 = np.uint64(0x94D049BB133111EB)
PURPOSES = {"bootstrap": 1, "half": 2, "reservoir": 3}


def splitmix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64's output function on a uint64 array (wrapping arithmetic), elementwise."""
    z = np.asarray(x, dtype=np.uint64) + _GOLDEN
    z = (z ^ (z >> np.uint64(30))) * _C1
    z = (z ^ (z >> np.uint64(27))) * _C2
    return z ^ (z >> np.uint64(31))


def _string_key(value: Any) -> int:
    return int.from_bytes(hashlib.blake2b(str(value).encode("utf-8"), digest_size=8).digest(), "little")


def sample_keys(ids: Any) -> np.ndarray:
    """64-bit keys of sample ids (see the module docstring); (n,) uint64."""
    arr = np.asarray(ids)
    if arr.dtype.kind in "iub":
        return arr.astype(np.int64, copy=False).view(np.uint64) if arr.dtype.kind != "u" else arr.astype(np.uint64)
    return np.fromiter((_string_key(v) for v in arr.reshape(-1)), dtype=np.uint64, count=arr.size)


def stream_constant(seed: int, purpose: str) -> np.uint64:
    """The constant that separates the streams of one seed (bootstrap, half, reservoir)."""
    base = splitmix64(np.array([int(seed) & MASK64], dtype=np.uint64))
    return splitmix64(base ^ np.uint64(PURPOSES[purpose]))[0]


def hash_keys(keys: np.ndarray, seed: int, purpose: str) -> np.ndarray:
    """Uniform 64-bit hashes of (seed, key, purpose); (n,) uint64."""
    return splitmix64(splitmix64(np.asarray(keys, dtype=np.uint64) ^ stream_constant(seed, purpose)))


def _poisson_table(size: int = 65536) -> np.ndarray:
    cdf = np.cumsum([math.exp(-1.0) / math.factorial(k) for k in range(20)]) * size
    return np.searchsorted(cdf, np.arange(size) + 0.5, side="right").astype(np.float64)


POISSON_TABLE = _poisson_table()


_POISSON_SOURCE = r"""
#include <stdint.h>

/* poisson_weights below in one pass: word w of sample i is SplitMix64((w + 1) * golden + base[i]);
   its 16-bit lanes, low first, are replicates 4w .. 4w + 3, looked up in the inverse-CDF table. */
void poisson_weights(int64_t n, int64_t n_boot, const uint64_t *base, const double *table, double *out)
{
    const uint64_t golden = 0x9E3779B97F4A7C15ULL;
    int64_t words = (n_boot + 3) / 4;
    for (int64_t w = 0; w < words; w++) {
        uint64_t step = (uint64_t)(w + 1) * golden;
        int64_t lanes = n_boot - 4 * w < 4 ? n_boot - 4 * w : 4;
        double *row = out + 4 * w * n;
        for (int64_t i = 0; i < n; i++) {
            uint64_t z = step + base[i] + golden;
            z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
            z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
            z = z ^ (z >> 31);
            for (int64_t j = 0; j < lanes; j++)
                row[j * n + i] = table[(z >> (16 * j)) & 0xFFFF];
        }
    }
}
"""
_POISSON_SIGNATURES = {"poisson_weights": [ctypes.c_int64, ctypes.c_int64] + [ctypes.c_void_p] * 3}


def poisson_weights(keys: np.ndarray, seed: int, n_bootstrap: int) -> np.ndarray:
    """Poisson(1) bootstrap weights (n_bootstrap, n), float64, each a function of (seed, key, b).

    One compiled pass where a C compiler is at hand (``backtrace.native``), else numpy, built
    replicate-major: the SplitMix64 words are drawn as (words, n), so each replicate's 16-bit
    draws are one strided copy and the table lookup writes the C-ordered matrix the bootstrap's
    product reads (no transposed copy). Both give the same values: integer arithmetic and a
    table lookup."""
    n = len(keys)
    words = -(-n_bootstrap // 4)
    base = hash_keys(keys, seed, "bootstrap")
    lib = native.library(_POISSON_SOURCE, _POISSON_SIGNATURES) if sys.byteorder == "little" else None
    if lib is not None and n and n_bootstrap > 0:
        out = np.empty((n_bootstrap, n), dtype=np.float64)
        base = np.ascontiguousarray(base)
        lib.poisson_weights(n, n_bootstrap, base.ctypes.data, POISSON_TABLE.ctypes.data, out.ctypes.data)
        return out
    steps = (np.arange(1, words + 1, dtype=np.uint64) * _GOLDEN)
    u = splitmix64(steps[:, None] + base[None, :])          # (words, n)
    u16 = u.view(np.uint16).reshape(words, n, 4).transpose(0, 2, 1).reshape(words * 4, n)[:n_bootstrap]
    return POISSON_TABLE[u16]


def halves(keys: np.ndarray, seed: int) -> np.ndarray:
    """The random half (0 or 1) of each sample for the stability estimate; (n,) int8."""
    return (hash_keys(keys, seed, "half") >> np.uint64(63)).astype(np.int8)


def reservoir_priority(keys: np.ndarray, seed: int) -> np.ndarray:
    """Bottom-k priorities of the samples (smaller is kept first); (n,) uint64."""
    return hash_keys(keys, seed, "reservoir")


@dataclass
class Draws:
    """The random draws of one batch, all keyed by its samples' ids (shared by every mode)."""

    keys: np.ndarray
    seed: int
    n_bootstrap: int
    _cache: dict[str, np.ndarray] = field(default_factory=dict, repr=False)

    @property
    def weights(self) -> np.ndarray:
        """Poisson(1) bootstrap weights (n_bootstrap, n)."""
        if "weights" not in self._cache:
            self._cache["weights"] = poisson_weights(self.keys, self.seed, self.n_bootstrap)
        return self._cache["weights"]

    @property
    def weight_totals(self) -> np.ndarray:
        """Each replicate's total weight over the batch (n_bootstrap,)."""
        if "totals" not in self._cache:
            self._cache["totals"] = self.weights.sum(1)
        return self._cache["totals"]

    @property
    def half(self) -> np.ndarray:
        """The stability half of each sample (n,)."""
        if "half" not in self._cache:
            self._cache["half"] = halves(self.keys, self.seed)
        return self._cache["half"]

    @classmethod
    def make(cls, seed: int, start: int, n: int, n_bootstrap: int) -> "Draws":
        """Draws for the samples whose ids are the row positions ``start .. start + n - 1``."""
        return cls(keys=sample_keys(np.arange(start, start + n, dtype=np.int64)), seed=int(seed),
                   n_bootstrap=int(n_bootstrap))

    @classmethod
    def for_keys(cls, keys: np.ndarray, seed: int, n_bootstrap: int) -> "Draws":
        """Draws for samples with these 64-bit keys."""
        return cls(keys=np.asarray(keys, dtype=np.uint64), seed=int(seed), n_bootstrap=int(n_bootstrap))
