"""Fused loops in C, compiled once per machine with the system's C compiler.

Contrastive routing (spec 4) is a dozen element-wise passes per affine layer in torch ops; they
are memory-bound and, on small layers, dispatch-bound. Here it is one loop that reads its inputs
once and writes its outputs once, with the same float operations in the same order as the torch
code it replaces (no fused multiply-add, no fast-math), so the result has the same bits. The add
rule's split of a residual's relevance by magnitude is another such loop (five full-size
temporaries in torch, each a fresh mapping of fresh pages). The default rule's quotient, the
saturation and sign probes and the books' per-sample sums are smaller such groups of calls.
Other packages (the stage's keyed draws) bring their own sources to ``library``.

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
/* x86-64: an AVX2 + FMA copy beside the baseline one, chosen by the loader for this processor
   (GCC 11 names that level x86-64-v3; older GCC takes Haswell, the first with both) */
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 11
#define CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#elif defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 6
#define CLONES __attribute__((target_clones("arch=haswell", "default")))
#else
#define CLONES
#endif

#define ROUTE(NAME, T, MAX)                                                                    \
static inline void NAME##_row(int64_t k, const T *restrict Rp, const T *restrict Rn,           \
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
CLONES void NAME(int64_t m, int64_t k,                                                         \
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
static inline void NAME##_row(int64_t k, const T *restrict r, const T *restrict a,             \
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
CLONES void NAME(int64_t m, int64_t k, const T *r, int64_t s_r, const T *a, int64_t s_a,       \
          const T *b, int64_t s_b, T *oa, int64_t s_oa, T *ob, int64_t s_ob)                   \
{                                                                                              \
    for (int64_t j = 0; j < m; j++)                                                            \
        NAME##_row(k, r + j * s_r, a + j * s_a, b + j * s_b, oa + j * s_oa, ob + j * s_ob);    \
}

SHARE(share_f32, float, FLT_MAX, __builtin_fabsf)
SHARE(share_f64, double, DBL_MAX, __builtin_fabs)

/* The books' per-sample sums (context.py): each row of k elements summed in double, by eight
   running sums (element i goes to sum i mod 8) added pairwise at the end. The order is fixed by
   k alone, so a row's sum never depends on the other rows or on the batch; the eight sums are
   independent, so the compiler may vectorise them without reassociating anything. */
#define KEEP(v) (v)
#define ROWSUM(NAME, T, ABS, TERM)                                                             \
static inline double NAME##_row(int64_t k, const T *restrict x, const double *restrict w)     \
{                                                                                              \
    double a[8] = {0, 0, 0, 0, 0, 0, 0, 0};                                                    \
    int64_t i = 0;                                                                             \
    for (; i + 8 <= k; i += 8)                                                                 \
        for (int j = 0; j < 8; j++)                                                            \
            a[j] += TERM((double)ABS(x[i + j]), i + j);                                        \
    for (int j = 0; i < k; i++, j++)                                                           \
        a[j] += TERM((double)ABS(x[i]), i);                                                    \
    return ((a[0] + a[1]) + (a[2] + a[3])) + ((a[4] + a[5]) + (a[6] + a[7]));                  \
}                                                                                              \
CLONES void NAME(int64_t m, int64_t k, const T *x, int64_t s_x, const double *w, double *out) \
{                                                                                              \
    for (int64_t r = 0; r < m; r++)                                                            \
        out[r] = NAME##_row(k, x + r * s_x, w);                                                \
}
#define PLAIN(v, i) (v)
#define WEIGHTED(v, i) ((v) * w[i])

ROWSUM(rowsum_f32, float, KEEP, PLAIN)
ROWSUM(rowsum_f64, double, KEEP, PLAIN)
ROWSUM(rowabs_f32, float, __builtin_fabsf, PLAIN)
ROWSUM(rowabs_f64, double, __builtin_fabs, PLAIN)
ROWSUM(rowdot_f32, float, KEEP, WEIGHTED)
ROWSUM(rowdot_f64, double, KEEP, WEIGHTED)

/* The affine rule's saturation probe (rules/affine.py, _saturated): whether some element of
   (t < bound) * R (or t > bound) is not zero, the comparison as a 0/1 value of the tensors'
   type times R, as the torch code computes it (a NaN or infinite R counts wherever it is). */
#define PROBE(NAME, T)                                                                         \
static inline int64_t NAME##_row(int64_t k, const T *restrict t, const T *restrict r, T bound, \
                                 int64_t below)                                                \
{                                                                                              \
    const T one = (T)1, zero = (T)0;                                                           \
    int64_t hit = 0;                                                                           \
    if (below)                                                                                 \
        for (int64_t i = 0; i < k; i++) { T c = t[i] < bound ? one : zero; hit |= c * r[i] != zero; } \
    else                                                                                       \
        for (int64_t i = 0; i < k; i++) { T c = t[i] > bound ? one : zero; hit |= c * r[i] != zero; } \
    return hit;                                                                                \
}                                                                                              \
CLONES int64_t NAME(int64_t m, int64_t k, const T *t, int64_t s_t, const T *r, int64_t s_r,   \
             double bound, int64_t below)                                                      \
{                                                                                              \
    for (int64_t j = 0; j < m; j++)                                                            \
        if (NAME##_row(k, t + j * s_t, r + j * s_r, (T)bound, below))                          \
            return 1;                                                                          \
    return 0;                                                                                  \
}

PROBE(probe_f32, float)
PROBE(probe_f64, double)

/* x >= 0 everywhere (a NaN is not), as torch's min(x) >= 0 decides it. */
#define NONNEG(NAME, T)                                                                        \
static inline int64_t NAME##_row(int64_t k, const T *restrict x)                              \
{                                                                                              \
    int64_t ok = 1;                                                                            \
    for (int64_t i = 0; i < k; i++) ok &= x[i] >= (T)0;                                        \
    return ok;                                                                                 \
}                                                                                              \
CLONES int64_t NAME(int64_t m, int64_t k, const T *x, int64_t s_x)                            \
{                                                                                              \
    for (int64_t j = 0; j < m; j++) /* in chunks: a mixed-sign input stops early */            \
        for (int64_t i = 0; i < k; i += 512)                                                   \
            if (!NAME##_row(k - i < 512 ? k - i : 512, x + j * s_x + i))                       \
                return 0;                                                                      \
    return 1;                                                                                  \
}

NONNEG(nonneg_f32, float)
NONNEG(nonneg_f64, double)

/* The default rule's quotient (rules/affine.py): s = R / (S + b) with nan and inf taken to 0,
   written over S, in the torch code's order (the add, the division, nan_to_num); and, with a
   bias, the relevance it absorbs per row, sum of s * |b| in double (context.absorb_product).
   Rows of `units` blocks of `inner` elements; b (units) is broadcast over each block. */
#define FIX(q, MAX) ((q) <= MAX ? ((q) >= -MAX ? (q) : 0) : 0)
#define QUOTIENT(NAME, T, MAX, DOT, SUM)                                                       \
static inline void NAME##_div(int64_t k, T *restrict s, const T *restrict r,                  \
                              const T *restrict b)                                             \
{                                                                                              \
    for (int64_t i = 0; i < k; i++) {                                                          \
        T q = r[i] / (s[i] + b[i]);                                                            \
        s[i] = FIX(q, MAX);                                                                    \
    }                                                                                          \
}                                                                                              \
static inline void NAME##_divc(int64_t k, T *restrict s, const T *restrict r, T bu)            \
{                                                                                              \
    for (int64_t i = 0; i < k; i++) {                                                          \
        T q = r[i] / (s[i] + bu);                                                              \
        s[i] = FIX(q, MAX);                                                                    \
    }                                                                                          \
}                                                                                              \
CLONES void NAME(int64_t m, int64_t units, int64_t inner, T *s, const T *r, const T *b,        \
                 const double *w, double *absorbed)                                            \
{                                                                                              \
    int64_t row = units * inner;                                                               \
    for (int64_t n = 0; n < m; n++) {                                                          \
        T *sn = s + n * row;                                                                   \
        const T *rn = r + n * row;                                                             \
        if (b == 0) {                                                                          \
            for (int64_t i = 0; i < row; i++) { T q = rn[i] / sn[i]; sn[i] = FIX(q, MAX); }    \
        } else if (inner == 1) { /* the quotients, then (in cache) the absorbed sum */         \
            NAME##_div(units, sn, rn, b);                                                      \
            absorbed[n] = DOT##_row(units, sn, w);                                             \
        } else {                                                                               \
            double t = 0;                                                                      \
            for (int64_t u = 0; u < units; u++) {                                              \
                NAME##_divc(inner, sn + u * inner, rn + u * inner, b[u]);                      \
                t += SUM##_row(inner, sn + u * inner, w) * w[u];                               \
            }                                                                                  \
            absorbed[n] = t;                                                                   \
        }                                                                                      \
    }                                                                                          \
}

QUOTIENT(quotient_f32, float, FLT_MAX, rowdot_f32, rowsum_f32)
QUOTIENT(quotient_f64, double, DBL_MAX, rowdot_f64, rowsum_f64)

/* pos_neg2's sides (rules/affine.py): 2P = S + D into P, 2N = S - D over S, and the precision
   test m = |D| + c1 S + c2 b > 0 (c1 = -(1 - 2 kappa), c2 = 2 kappa), each step as torch's
   add with alpha computes it on this processor: one fused multiply-add (`fused`: torch's
   vectorised kernels on AVX2 and later) or a rounded product, then a rounded sum. Rows of
   `units` blocks of `inner`; flag rows of `frow` elements (a multiple of units * inner):
   flags[f] = 1 where some m > 0 in row f. Returns the number of flagged rows, or -1 where some
   m is NaN (the torch code's max is then NaN and flags nothing). */
#define SIDES(NAME, T, ABS, FMA)                                                               \
static inline int64_t NAME##_run(int64_t k, T *restrict s, const T *restrict d,              \
                                 T *restrict p, const T *restrict b, int64_t bstep,            \
                                 int64_t has_b, T c1, T c2, int64_t fused, int64_t *nan)       \
{                                                                                              \
    int32_t hit = 0, bad = 0;                                                                  \
    if (fused)                                                                                 \
        for (int64_t i = 0; i < k; i++) {                                                      \
            T sv = s[i], dv = d[i];                                                            \
            T mv = FMA(c1, sv, ABS(dv));                                                       \
            if (has_b) mv = FMA(c2, b[i * bstep], mv);                                         \
            hit |= mv > (T)0;                                                                  \
            bad |= mv != mv;                                                                   \
            p[i] = sv + dv;                                                                    \
            s[i] = sv - dv;                                                                    \
        }                                                                                      \
    else                                                                                       \
        for (int64_t i = 0; i < k; i++) {                                                      \
            T sv = s[i], dv = d[i];                                                            \
            T prod = c1 * sv;                                                                  \
            T mv = ABS(dv) + prod;                                                             \
            if (has_b) { T pb = c2 * b[i * bstep]; mv = mv + pb; }                             \
            hit |= mv > (T)0;                                                                  \
            bad |= mv != mv;                                                                   \
            p[i] = sv + dv;                                                                    \
            s[i] = sv - dv;                                                                    \
        }                                                                                      \
    *nan |= bad;                                                                               \
    return hit;                                                                                \
}                                                                                              \
CLONES int64_t NAME(int64_t frows, int64_t frow, int64_t units, int64_t inner, T *s,           \
                    const T *d, T *p, const T *b, double c1d, double c2d, int64_t fused,       \
                    int8_t *flags)                                                             \
{                                                                                              \
    const T c1 = (T)c1d, c2 = (T)c2d, none = (T)0; /* b[i * bstep] is always a valid read */   \
    int64_t count = 0, nan = 0, block = units * inner;                                         \
    for (int64_t f = 0; f < frows; f++) {                                                      \
        int64_t hit = 0;                                                                       \
        for (int64_t o = f * frow; o < (f + 1) * frow; o += block) {                           \
            if (b == 0)                                                                        \
                hit |= NAME##_run(block, s + o, d + o, p + o, &none, 0, 0, c1, c2, fused, &nan); \
            else if (inner == 1)                                                               \
                hit |= NAME##_run(units, s + o, d + o, p + o, b, 1, 1, c1, c2, fused, &nan);    \
            else                                                                               \
                for (int64_t u = 0; u < units; u++)                                            \
                    hit |= NAME##_run(inner, s + o + u * inner, d + o + u * inner,             \
                                      p + o + u * inner, b + u, 0, 1, c1, c2, fused, &nan);  \
        }                                                                                      \
        flags[f] = (int8_t)hit;                                                                \
        count += hit;                                                                          \
    }                                                                                          \
    return nan ? -1 : count;                                                                   \
}

SIDES(sides_f32, float, __builtin_fabsf, __builtin_fmaf)
SIDES(sides_f64, double, __builtin_fabs, __builtin_fma)

/* The identity split's last steps (rules/affine.py, _spread): a <- a + b and b <- (a + b) - 2b
   over the half coefficients, then, per map, g <- g |x| + h x (each product rounded, then the
   sum), as the torch code's in-place operations; |x| from xa, or taken here when xa is null. */
#define SUMDIFF(NAME, T, ABS)                                                                     \
CLONES void NAME(int64_t k, T *restrict a, T *restrict b)                                      \
{                                                                                              \
    for (int64_t i = 0; i < k; i++) {                                                          \
        T sv = a[i] + b[i];                                                                    \
        T tb = (T)-2 * b[i];                                                                   \
        a[i] = sv;                                                                             \
        b[i] = sv + tb;                                                                        \
    }                                                                                          \
}                                                                                              \
CLONES void NAME##_mix(int64_t maps, int64_t k, T *restrict g, const T *restrict h,           \
                       const T *restrict xa, const T *restrict x)                              \
{                                                                                              \
    for (int64_t m = 0; m < maps; m++)                                                         \
        if (xa == 0) /* |x| taken here: no buffer for it */                                    \
            for (int64_t i = 0; i < k; i++) {                                                  \
                T u = g[m * k + i] * ABS(x[i]), v = h[m * k + i] * x[i];                       \
                g[m * k + i] = u + v;                                                          \
            }                                                                                  \
        else                                                                                   \
            for (int64_t i = 0; i < k; i++) {                                                  \
                T u = g[m * k + i] * xa[i], v = h[m * k + i] * x[i];                           \
                g[m * k + i] = u + v;                                                          \
            }                                                                                  \
}

SUMDIFF(sumdiff_f32, float, __builtin_fabsf)
SUMDIFF(sumdiff_f64, double, __builtin_fabs)

/* The books (walk.py): row rows[c] of acc (rows of n doubles) += row from[c] of src, for c in
   order (index_add_'s order, so the same bits). */
void addrows(int64_t n, int64_t count, double *restrict acc, const int64_t *rows,
             const double *restrict src, const int64_t *from)
{
    for (int64_t c = 0; c < count; c++) {
        double *restrict dst = acc + rows[c] * n;
        const double *restrict row = src + from[c] * n;
        for (int64_t i = 0; i < n; i++)
            dst[i] += row[i];
    }
}
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


def _toolchain(cxx: bool) -> tuple[str | None, list[str], list[str], str]:
    """(compiler, flags, link arguments, source suffix). C++ sources are built against this
    torch's own headers and ``libc10`` (with its C++ ABI), so they may implement c10 interfaces."""
    if not cxx:
        return shutil.which(os.environ.get("CC", "cc")), _FLAGS, ["-lm"], ".c"
    root = Path(torch.__file__).parent
    flags = ["-O2", "-fPIC", "-shared", "-std=c++17", f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
             f"-I{root / 'include'}"]
    return (shutil.which(os.environ.get("CXX", "c++")), flags,
            [f"-L{root / 'lib'}", "-lc10", f"-Wl,-rpath,{root / 'lib'}"], ".cpp")


def _build(source: str, signatures: dict[str, list], cxx: bool = False) -> ctypes.CDLL | None:
    """The compiled library of ``source`` (built here if the cache lacks it), or None where it
    can't be."""
    cc, flags, link, suffix = _toolchain(cxx)
    if cc is None:
        log.debug("no %s compiler: torch/numpy code runs instead of the fused kernels", "C++" if cxx else "C")
        return None
    key = hashlib.sha256("\0".join([source, " ".join(flags + link), _compiler_id(cc), platform.machine(),
                                    sys.platform, torch.__version__ if cxx else ""]).encode()).hexdigest()[:16]
    folder = _cache_dir()
    path = folder / f"governance_kernels_{key}.so"
    if not path.exists():
        try:
            folder.mkdir(parents=True, exist_ok=True, mode=0o700)
            with tempfile.TemporaryDirectory(dir=folder) as tmp:
                src = Path(tmp) / f"kernels{suffix}"
                src.write_text(source)
                out = Path(tmp) / path.name
                subprocess.run([cc, *flags, "-o", str(out), str(src), *link], check=True,
                               capture_output=True, timeout=300)
                os.replace(out, path)  # atomic: a concurrent builder's copy is the same bytes
        except (OSError, subprocess.SubprocessError) as exc:
            log.debug("fused kernels not built (%s%s): torch/numpy code runs instead", exc,
                      f"; {exc.stderr[-2000:]!r}" if isinstance(exc, subprocess.CalledProcessError) else "")
            return None
    try:
        lib = ctypes.CDLL(str(path))
        for name, sig in signatures.items():
            fn = getattr(lib, name)
            fn.argtypes, fn.restype = sig if isinstance(sig, tuple) else (sig, None)
    except (OSError, AttributeError) as exc:
        log.debug("fused kernels not loaded (%s): torch/numpy code runs instead", exc)
        return None
    return lib


def library(source: str, signatures: dict[str, list], cxx: bool = False) -> ctypes.CDLL | None:
    """The compiled ``source`` (C, or C++ against torch's c10 when ``cxx``) with ``signatures``
    ({function: ctypes argtypes} for a function that returns void, or {function: (argtypes,
    restype)}), built or loaded once per process; None when disabled (``GOVERNANCE_NATIVE=0``)
    or unavailable, and the caller runs its own torch or numpy code, which gives the same result."""
    if os.environ.get("GOVERNANCE_NATIVE", "1") == "0":
        return None
    if source not in _libs:
        with _lock:
            if source not in _libs:
                _libs[source] = _build(source, signatures, cxx)
    return _libs[source]


_I64, _PTR = ctypes.c_int64, ctypes.c_void_p
_SIGNATURES = {**{name: [_I64, _I64] + [_PTR, _I64] * 9 for name in ("route_f32", "route_f64")},
               **{name: [_I64, _I64] + [_PTR, _I64] * 5 for name in ("share_f32", "share_f64")},
               **{f"{kind}_{t}": [_I64, _I64, _PTR, _I64, _PTR, _PTR]
                  for kind in ("rowsum", "rowabs", "rowdot") for t in ("f32", "f64")},
               **{f"probe_{t}": ([_I64, _I64, _PTR, _I64, _PTR, _I64, ctypes.c_double, _I64], _I64)
                  for t in ("f32", "f64")},
               **{f"nonneg_{t}": ([_I64, _I64, _PTR, _I64], _I64) for t in ("f32", "f64")},
               **{f"quotient_{t}": [_I64, _I64, _I64] + [_PTR] * 5 for t in ("f32", "f64")},
               **{f"sides_{t}": ([_I64] * 4 + [_PTR] * 4 + [ctypes.c_double] * 2 + [_I64, _PTR], _I64)
                  for t in ("f32", "f64")},
               **{f"sumdiff_{t}": [_I64, _PTR, _PTR] for t in ("f32", "f64")},
               **{f"sumdiff_{t}_mix": [_I64, _I64] + [_PTR] * 4 for t in ("f32", "f64")},
               "addrows": [_I64, _I64, _PTR, _PTR, _PTR, _PTR]}
_SUFFIX = {torch.float32: "f32", torch.float64: "f64"}


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


def _kernel(kind: str, tensors: tuple[torch.Tensor, ...]) -> str | None:
    """The kernel ``kind`` for the tensors' dtype (``route_f32``, ...), when every tensor is a
    CPU tensor of that dtype and one shape and the kernels are at hand; None otherwise (checked
    before a caller allocates outputs for it)."""
    first = tensors[0]
    suffix = _SUFFIX.get(first.dtype)
    if suffix is None or first.numel() == 0:
        return None
    dtype, shape = first.dtype, first.shape
    if not all(v.dtype is dtype and v.shape == shape and v.is_cpu and not v.requires_grad for v in tensors):
        return None
    return f"{kind}_{suffix}" if library(_SOURCE, _SIGNATURES) is not None else None


def _call(name: str, tensors: tuple[torch.Tensor, ...]) -> bool:
    """Run kernel ``name`` (``_kernel``) over the tensors laid out as rows (``_rows``); False
    (nothing written) when they have no common row layout."""
    if all(v.is_contiguous() for v in tensors):  # one row of every element (the common case)
        m, k = 1, tensors[0].numel()
        strides = [k] * len(tensors)
    else:
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
    name = _kernel("share", (R, a, b))
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
    name = _kernel("route", tensors)
    return name is not None and _call(name, tensors)


# --- small probes and per-sample sums ---------------------------------------------------------
# These replace two to four torch calls each (a comparison, a product, a count; a sum and a
# conversion) on tensors that are often small, where each call costs more in dispatch than in
# arithmetic. They take contiguous tensors only: the check is a few attribute reads.

def _plain(t: torch.Tensor) -> str | None:
    """The type suffix of a non-empty contiguous CPU float32/float64 tensor without autograd
    (one the kernels can read); None otherwise."""
    suffix = _SUFFIX.get(t.dtype)
    if suffix is None or not t.is_cpu or t.requires_grad or not t.is_contiguous() or t.numel() == 0:
        return None
    return suffix


def _twins(a: torch.Tensor, b: torch.Tensor) -> str | None:
    """The type suffix (``_plain``) of two tensors the kernels can read as one layout: both
    plain, of one dtype and one shape; None otherwise."""
    suffix = _plain(a)
    if suffix is None or b.dtype is not a.dtype or b.shape != a.shape or _plain(b) is None:
        return None
    return suffix


def _fn(name: str):
    """Kernel ``name`` of the library, or None without the kernels."""
    lib = library(_SOURCE, _SIGNATURES)
    return None if lib is None else getattr(lib, name)


def row_sums(t: torch.Tensor, rows: int, absolute: bool = False,
             weights: torch.Tensor | None = None) -> torch.Tensor | None:
    """Per-row sums of ``t`` seen as (rows, -1), accumulated in float64: of t, of |t|
    (``absolute``), or of t times ``weights`` (a float64 vector as long as a row). Each row's
    sum is added in an order fixed by the row length alone. None when ``t`` is not a contiguous
    CPU float tensor with whole rows, or without the kernels."""
    suffix = _plain(t)
    if suffix is None or rows <= 0 or t.numel() % rows:
        return None
    k = t.numel() // rows
    if weights is not None:
        if not (weights.dtype is torch.float64 and weights.is_cpu and weights.is_contiguous()
                and weights.numel() == k):
            return None
        kind, w = "rowdot", weights.data_ptr()
    else:
        kind, w = ("rowabs" if absolute else "rowsum"), None
    fn = _fn(f"{kind}_{suffix}")
    if fn is None:
        return None
    out = torch.empty(rows, dtype=torch.float64)
    fn(rows, k, t.data_ptr(), k, w, out.data_ptr())
    return out


def any_beyond(t: torch.Tensor, R: torch.Tensor, bound: float, below: bool) -> bool | None:
    """Whether (t < bound) * R (``below``; else t > bound) has an element that is not zero, the
    comparison a 0/1 value of R's type; None when the tensors are not contiguous CPU float
    tensors of one dtype and shape, or without the kernels."""
    suffix = _twins(R, t)
    if suffix is None:
        return None
    fn = _fn(f"probe_{suffix}")
    if fn is None:
        return None
    return bool(fn(1, R.numel(), t.data_ptr(), 0, R.data_ptr(), 0, float(bound), int(below)))


def all_nonnegative(x: torch.Tensor) -> bool | None:
    """x >= 0 everywhere (False where an element is NaN); None when ``x`` is not a contiguous
    CPU float tensor, or without the kernels."""
    suffix = _plain(x)
    fn = None if suffix is None else _fn(f"nonneg_{suffix}")
    return None if fn is None else bool(fn(1, x.numel(), x.data_ptr(), 0))


def _bias_layout(S: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, int, int] | None:
    """(b without its leading axes of size 1, units, inner) when ``b`` is a contiguous tensor of
    S's type aligned with S's trailing axes, one value per unit (the axes after it of size 1),
    so that S is rows of ``units`` blocks of ``inner`` elements; None otherwise."""
    while b.dim() > 1 and b.shape[0] == 1:  # (1, C, 1, 1): leading axes of size 1 broadcast
        b = b[0]
    if b.dim() == 0 or b.dim() >= S.dim() or _plain(b) is None or b.dtype is not S.dtype:
        return None
    units = b.shape[0]
    if S.shape[S.dim() - b.dim()] != units or any(v != 1 for v in b.shape[1:]):
        return None
    return b, units, math.prod(S.shape[S.dim() - b.dim() + 1:])


def bias_quotient(R: torch.Tensor, S: torch.Tensor, b: torch.Tensor | None,
                  b64: torch.Tensor | None = None) -> torch.Tensor | None:
    """S <- R / (S + b) in place, 0 where that is not finite (the bits of ``safe_div(R, S.add_(b))``),
    in one pass; with a bias, returns the relevance it absorbs per row of S seen as
    (rows, b.shape[0], inner): sum of s * b in float64 (``b64``: b flattened in float64, when
    the caller keeps it); without one, an empty tensor. ``b`` is aligned with S's trailing axes,
    one value per unit (the ones after it of size 1). None (nothing written) when the tensors are
    not contiguous CPU float tensors of one dtype laid out so, or without the kernels."""
    suffix = _twins(S, R)
    if suffix is None:
        return None
    units, inner = 1, 1
    if b is not None:
        layout = _bias_layout(S, b)
        if layout is None:
            return None
        b, units, inner = layout
        if b64 is None:
            b64 = b.reshape(-1).to(torch.float64)
        if not (b64.dtype is torch.float64 and b64.is_contiguous() and b64.numel() == units):
            return None
    fn = _fn(f"quotient_{suffix}")
    if fn is None:
        return None
    rows = S.numel() // (units * inner)
    out = torch.empty(rows if b is not None else 0, dtype=torch.float64)
    fn(rows, units, inner, S.data_ptr(), R.data_ptr(), None if b is None else b.data_ptr(),
        None if b is None else b64.data_ptr(), out.data_ptr() if b is not None else None)
    return out


def sides(S: torch.Tensor, D: torch.Tensor, b: torch.Tensor | None, c1: float, c2: float,
          frows: int) -> tuple[torch.Tensor, int, torch.Tensor] | None:
    """``pos_neg2``'s element-wise work in one pass: (2P = S + D as a new tensor, the number of
    flag rows where m = |D| + c1 S + c2 b > 0 somewhere, or -1 where some m is NaN, the (frows,)
    int8 flags), with 2N = S - D written over S. m is rounded as torch's in-place adds with
    alpha round it here (``fuses_add``), so the decisions are torch's. ``b`` as in
    ``bias_quotient``. None (nothing written) when the tensors are not contiguous CPU float
    tensors of one dtype and shape laid out so, or without the kernels."""
    suffix = _twins(S, D)
    if suffix is None or frows <= 0 or S.numel() % frows:
        return None
    frow = S.numel() // frows
    units, inner = 1, frow
    if b is not None:
        layout = _bias_layout(S, b)
        if layout is None:
            return None
        b, units, inner = layout
        if frow % (units * inner):
            return None
    fn = _fn(f"sides_{suffix}")
    if fn is None:
        return None
    P = torch.empty_like(S)
    flags = torch.empty(frows, dtype=torch.int8)
    count = fn(frows, frow, units, inner, S.data_ptr(), D.data_ptr(), P.data_ptr(),
               None if b is None else b.data_ptr(), float(c1), float(c2), int(fuses_add(S.dtype)),
               flags.data_ptr())
    return P, int(count), flags


_FUSES: dict[torch.dtype, bool] = {}
#: the probe's alpha: the precision test's own coefficient -(1 - 2κ) over 3, so that the
#: product with a random value is rarely exact and the two roundings differ on many of them
_PROBE_ALPHA = -(1.0 - 2.0 / 16.0) / 3.0


def fuses_add(dtype: torch.dtype) -> bool:
    """Whether torch's ``a.add(b, alpha=c)`` rounds once (a fused multiply-add: its vectorised
    CPU kernels on AVX2 and later) or twice (the product, then the sum), for ``dtype`` on this
    processor; found once by a probe on values where the two differ."""
    known = _FUSES.get(dtype)
    if known is None:
        g = torch.Generator().manual_seed(0)
        a, b = torch.randn(4096, generator=g, dtype=dtype), torch.randn(4096, generator=g, dtype=dtype)
        twice = a + torch.tensor(_PROBE_ALPHA, dtype=dtype) * b
        known = _FUSES[dtype] = not torch.equal(a.add(b, alpha=_PROBE_ALPHA), twice)
    return known


def sum_diff(a: torch.Tensor, b: torch.Tensor) -> bool:
    """a <- a + b, b <- (a + b) - 2b in one pass (the bits of ``a.add_(b)`` and
    ``torch.add(a, b, alpha=-2, out=b)``); False (nothing written) when the two are not
    contiguous CPU float tensors of one dtype and shape, or without the kernels."""
    suffix = _twins(a, b)
    fn = None if suffix is None else _fn(f"sumdiff_{suffix}")
    if fn is not None:
        fn(a.numel(), a.data_ptr(), b.data_ptr())
    return fn is not None


def mix(g: torch.Tensor, h: torch.Tensor, xa: torch.Tensor | None, x: torch.Tensor) -> bool:
    """g <- g ⊙ xa + h ⊙ x in one pass, g and h holding one or more maps of x's shape one after
    the other (the bits of ``g.mul_(xa)``, ``h.mul_(x)``, ``g.add_(h)``); ``xa`` None: |x|,
    taken in the pass (no buffer for it). False (nothing written) when the tensors are not
    contiguous CPU float tensors of one dtype laid out so, or without the kernels."""
    suffix, k = _twins(g, h), x.numel()
    if (suffix is None or _twins(x, x if xa is None else xa) is None or x.dtype is not g.dtype
            or g.numel() % k):
        return False
    fn = _fn(f"sumdiff_{suffix}_mix")
    if fn is None:
        return False
    fn(g.numel() // k, k, g.data_ptr(), h.data_ptr(), None if xa is None else xa.data_ptr(), x.data_ptr())
    return True


def add_rows(acc: torch.Tensor, index: torch.Tensor, sources: torch.Tensor, take: torch.Tensor) -> bool:
    """``acc.index_add_(0, index, sources[take])`` in one plain pass without the gathered copy:
    row take[i] of ``sources`` added to row index[i] of ``acc``, in order, the same bits.
    ``index`` and ``take`` must hold rows of ``acc`` and ``sources`` (the caller's plan
    guarantees it: nothing checks each value). False (nothing written) unless ``acc`` and
    ``sources`` are contiguous CPU float64 matrices with rows of one length and ``index`` and
    ``take`` contiguous CPU int64 vectors of one length; or without the kernels."""
    if not (acc.dtype is torch.float64 and sources.dtype is torch.float64 and acc.dim() == 2
            and sources.dim() == 2 and acc.shape[1] == sources.shape[1] and _plain(acc) and _plain(sources)
            and all(v.dtype is torch.int64 and v.is_cpu and v.is_contiguous() for v in (index, take))
            and index.numel() == take.numel()):
        return False
    fn = _fn("addrows")
    if fn is None:
        return False
    fn(acc.shape[1], index.numel(), acc.data_ptr(), index.data_ptr(), sources.data_ptr(), take.data_ptr())
    return True
