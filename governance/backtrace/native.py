"""Fused loops in C, compiled once per machine with the system's C compiler.

Contrastive routing (spec 4) is a dozen element-wise passes per affine layer in torch ops; they
are memory-bound and, on small layers, dispatch-bound. Here it is one loop that reads its inputs
once and writes its outputs once, with the same float operations in the same order as the torch
code it replaces (no fused multiply-add, no fast-math), so the result has the same bits. The add
rule's split of a residual's relevance by magnitude is another such loop (five full-size
temporaries in torch, each a fresh mapping of fresh pages). Other packages (the stage's keyed
draws) bring their own sources to ``library``.

A source is built on first use with ``cc`` (``$CC``) into a cache folder
(``$GOVERNANCE_KERNEL_CACHE``, else ``$XDG_CACHE_HOME/mlflow-governance/kernels``, else
``~/.cache/...``), named by a hash of the source, the flags and the compiler, and loaded with
ctypes, which releases the GIL during each call. Without a compiler, or with
``GOVERNANCE_NATIVE=0``, callers run their torch or numpy code: the same answer, only slower.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import torch

log = logging.getLogger(__name__)

_SOURCE = r"""
#include <stdint.h>
#include <float.h>

/* Spec 4's routing of R+ and R- into the half coefficients of each side; see _route in
   rules/affine.py, whose torch operations these mirror one by one. Arrays are (m rows, k
   contiguous elements), each with its own row stride in elements. Written without branches
   (every condition a select) so that the compiler vectorises the loop: the signs it tests are
   data, and mispredicted branches cost more than the arithmetic. */
/* x86-64: an AVX2 copy beside the baseline one, chosen by the loader for this processor */
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define CLONES __attribute__((target_clones("avx2", "default")))
#else
#define CLONES
#endif

#define ROUTE(NAME, T, MAX)                                                                    \
CLONES static void NAME##_row(int64_t k, const T *restrict Rp, const T *restrict Rn,           \
                       const T *restrict tt, const T *restrict P2, const T *restrict N2,       \
                       T *restrict Ap, T *restrict Bp, T *restrict An, T *restrict Bn)         \
{                                                                                              \
    const T one = (T)1, zero = (T)0;                                                           \
    for (int64_t i = 0; i < k; i++) {                                                          \
        T ip0 = one / P2[i], in0 = one / N2[i];                                                \
        ip0 = ip0 <= MAX ? (ip0 >= -MAX ? ip0 : zero) : zero; /* nan_to_num: nan, inf -> 0 */  \
        in0 = in0 <= MAX ? (in0 >= -MAX ? in0 : zero) : zero;                                  \
        T ti = tt[i], pv = Rp[i], nv = Rn[i];                                                  \
        /* a mixed unit with t = 0 passes nothing */                                           \
        T mixed = ip0 != zero ? (in0 != zero ? one : zero) : zero;                             \
        T ip = ti == zero ? (mixed == one ? zero : ip0) : ip0;                                 \
        T in = ti == zero ? (mixed == one ? zero : in0) : in0;                                 \
        T d = pv - nv;                                                                         \
        d = d * ti;                                                                            \
        T agree = d > zero ? one : zero;                                                       \
        T no_p = ip == zero ? one : zero, no_n = in == zero ? one : zero;                      \
        T disagree = agree == zero ? one : zero;                                               \
        T m1 = no_n > agree ? no_n : agree;                                                    \
        T m2 = no_p > agree ? no_p : agree;                                                    \
        T m3 = no_p > disagree ? no_p : disagree;                                              \
        T m4 = no_n > disagree ? no_n : disagree;                                              \
        T a = m1 * ip; Ap[i] = a * pv;                                                         \
        T b = m2 * in; Bn[i] = b * nv;                                                         \
        T c = m3 * in; Bp[i] = c * pv;                                                         \
        T e = m4 * ip; An[i] = e * nv;                                                         \
    }                                                                                          \
}                                                                                              \
void NAME(int64_t m, int64_t k,                                                                \
          const T *rp, int64_t s_rp, const T *rn, int64_t s_rn, const T *t, int64_t s_t,       \
          const T *p2, int64_t s_p2, const T *n2, int64_t s_n2,                                \
          T *ap, int64_t s_ap, T *bp, int64_t s_bp, T *an, int64_t s_an, T *bn, int64_t s_bn)  \
{                                                                                              \
    for (int64_t r = 0; r < m; r++)                                                            \
        NAME##_row(k, rp + r * s_rp, rn + r * s_rn, t + r * s_t, p2 + r * s_p2, n2 + r * s_n2, \
                   ap + r * s_ap, bp + r * s_bp, an + r * s_an, bn + r * s_bn);                \
}

ROUTE(route_f32, float, FLT_MAX)
ROUTE(route_f64, double, DBL_MAX)

/* The add rule's split of R between two terms by magnitude (rules/elementwise.py): q = R / (|a|
   + |b|) with nan and inf taken to 0, then q |a| and q |b|, in the torch code's order. */
#define SHARE(NAME, T, MAX, ABS)                                                                    \
CLONES static void NAME##_row(int64_t k, const T *restrict r, const T *restrict a,             \
                              const T *restrict b, T *restrict oa, T *restrict ob)             \
{                                                                                              \
    const T zero = (T)0;                                                                       \
    for (int64_t i = 0; i < k; i++) {                                                          \
        T ma = ABS(a[i]), mb = ABS(b[i]);                                                      \
        T q = r[i] / (ma + mb);                                                                \
        q = q <= MAX ? (q >= -MAX ? q : zero) : zero;                                          \
        oa[i] = q * ma;                                                                        \
        ob[i] = q * mb;                                                                        \
    }                                                                                          \
}                                                                                              \
void NAME(int64_t m, int64_t k, const T *r, int64_t s_r, const T *a, int64_t s_a,              \
          const T *b, int64_t s_b, T *oa, int64_t s_oa, T *ob, int64_t s_ob)                   \
{                                                                                              \
    for (int64_t j = 0; j < m; j++)                                                            \
        NAME##_row(k, r + j * s_r, a + j * s_a, b + j * s_b, oa + j * s_oa, ob + j * s_ob);    \
}

SHARE(share_f32, float, FLT_MAX, __builtin_fabsf)
SHARE(share_f64, double, DBL_MAX, __builtin_fabs)
"""

_FLAGS = ["-O3", "-fPIC", "-shared", "-ffp-contract=off", "-fno-fast-math", "-std=c99"]

_lock = threading.Lock()
_libs: dict[str, ctypes.CDLL | None] = {}


def _cache_dir() -> Path:
    own = os.environ.get("GOVERNANCE_KERNEL_CACHE")
    if own:
        return Path(own)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "mlflow-governance" / "kernels"


def _compiler_id(cc: str) -> str:
    try:
        return subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return ""


def _build(source: str, signatures: dict[str, list]) -> ctypes.CDLL | None:
    """The compiled library of ``source`` (built here if the cache lacks it), or None where it
    can't be."""
    cc = shutil.which(os.environ.get("CC", "cc"))
    if cc is None:
        log.debug("no C compiler: torch/numpy code runs instead of the fused kernels")
        return None
    key = hashlib.sha256("\0".join([source, " ".join(_FLAGS), _compiler_id(cc), platform.machine(),
                                    sys.platform]).encode()).hexdigest()[:16]
    folder = _cache_dir()
    path = folder / f"governance_kernels_{key}.so"
    if not path.exists():
        try:
            folder.mkdir(parents=True, exist_ok=True, mode=0o700)
            with tempfile.TemporaryDirectory(dir=folder) as tmp:
                src = Path(tmp) / "kernels.c"
                src.write_text(source)
                out = Path(tmp) / path.name
                subprocess.run([cc, *_FLAGS, "-o", str(out), str(src), "-lm"], check=True,
                               capture_output=True, timeout=120)
                os.replace(out, path)  # atomic: a concurrent builder's copy is the same bytes
        except (OSError, subprocess.SubprocessError) as exc:
            log.debug("fused kernels not built (%s): torch/numpy code runs instead", exc)
            return None
    try:
        lib = ctypes.CDLL(str(path))
        for name, argtypes in signatures.items():
            fn = getattr(lib, name)
            fn.argtypes = argtypes
            fn.restype = None
    except (OSError, AttributeError) as exc:
        log.debug("fused kernels not loaded (%s): torch/numpy code runs instead", exc)
        return None
    return lib


def library(source: str, signatures: dict[str, list]) -> ctypes.CDLL | None:
    """The compiled C ``source`` with ``signatures`` ({function: ctypes argtypes}; every function
    returns void), built or loaded once per process; None when disabled (``GOVERNANCE_NATIVE=0``)
    or unavailable, and the caller runs its own torch or numpy code, which gives the same result."""
    if os.environ.get("GOVERNANCE_NATIVE", "1") == "0":
        return None
    if source not in _libs:
        with _lock:
            if source not in _libs:
                _libs[source] = _build(source, signatures)
    return _libs[source]


_I64, _PTR = ctypes.c_int64, ctypes.c_void_p
_SIGNATURES = {**{name: [_I64, _I64] + [_PTR, _I64] * 9 for name in ("route_f32", "route_f64")},
               **{name: [_I64, _I64] + [_PTR, _I64] * 5 for name in ("share_f32", "share_f64")}}
_ROUTE = {torch.float32: "route_f32", torch.float64: "route_f64"}
_SHARE = {torch.float32: "share_f32", torch.float64: "share_f64"}


def _split(shape: tuple[int, ...], stride: tuple[int, ...]) -> int:
    """The first axis from which ``shape`` is contiguous in memory (axes of size 1 aside)."""
    expect, d = 1, len(shape)
    while d > 0 and (shape[d - 1] == 1 or stride[d - 1] == expect):
        expect *= shape[d - 1]
        d -= 1
    return d


def _rows(tensors: tuple[torch.Tensor, ...]) -> tuple[int, int, list[int]] | None:
    """(rows, k, row strides): every tensor as rows of k contiguous elements, each with one row
    stride (its axes before the split collapse into one), for the largest such k; or None."""
    shape = tuple(tensors[0].shape)
    strides = [v.stride() for v in tensors]
    d = max(_split(shape, st) for st in strides)
    k = math.prod(shape[d:])
    if d == 0:
        return 1, k, [k] * len(tensors)
    rows, out = math.prod(shape[:d]), []
    for st in strides:
        step = None
        for i in range(d - 1, -1, -1):  # the leading axes step by one stride
            if shape[i] == 1:
                continue
            if step is None:
                step, span = st[i], st[i] * shape[i]
            elif st[i] != span:
                return None
            else:
                span *= shape[i]
        out.append(step if step is not None else k)
    return rows, k, out


def _kernel(names: dict[torch.dtype, str], tensors: tuple[torch.Tensor, ...]) -> str | None:
    """The kernel of ``names`` for the tensors' dtype, when every tensor is a CPU tensor of that
    dtype and one shape and the kernels are at hand; None otherwise (checked before a caller
    allocates outputs for it)."""
    first = tensors[0]
    name = names.get(first.dtype)
    if name is None or first.numel() == 0:
        return None
    dtype, shape = first.dtype, first.shape
    if not all(v.dtype is dtype and v.shape == shape and v.is_cpu and not v.requires_grad for v in tensors):
        return None
    return name if library(_SOURCE, _SIGNATURES) is not None else None


def _call(name: str, tensors: tuple[torch.Tensor, ...]) -> bool:
    """Run kernel ``name`` (``_kernel``) over the tensors laid out as rows (``_rows``); False
    (nothing written) when they have no common row layout."""
    layout = _rows(tensors)
    if layout is None:
        return False
    m, k, strides = layout
    args: list[int] = [m, k]
    for v, st in zip(tensors, strides):
        args += [v.data_ptr(), st]
    getattr(library(_SOURCE, _SIGNATURES), name)(*args)
    return True


def share(R: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(R |a| / (|a| + |b|), R |b| / (|a| + |b|)) with 0 where the quotient is not finite, in
    one pass with the bits of the add rule's torch operations; None when the kernels are not at
    hand or the tensors do not share one dtype, shape and row layout."""
    name = _kernel(_SHARE, (R, a, b))
    if name is None:
        return None
    oa, ob = torch.empty_like(R), torch.empty_like(R)
    return (oa, ob) if _call(name, (R, a, b, oa, ob)) else None


def route(Rp: torch.Tensor, Rn: torch.Tensor, t: torch.Tensor, p2: torch.Tensor, n2: torch.Tensor,
          ap: torch.Tensor, bp: torch.Tensor, an: torch.Tensor, bn: torch.Tensor) -> bool:
    """Spec 4's routing (``rules.affine._route``) in one pass, when every tensor is a CPU float32
    or float64 tensor of one shape laid out as rows of contiguous elements; False (nothing
    written) otherwise, or without the compiled kernels. ``p2`` / ``n2`` (2P, 2N) are only read."""
    tensors = (Rp, Rn, t, p2, n2, ap, bp, an, bn)
    name = _kernel(_ROUTE, tensors)
    return name is not None and _call(name, tensors)
