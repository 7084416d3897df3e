"""The engine's CPU memory arena: large buffers kept between explain calls.

A walk allocates and frees hundreds of full-size tensors (activations, relevance maps, the
rules' temporaries). glibc maps every block over 32 MiB fresh and gives freed heap memory back
to the system when enough of it sits at the top, so most calls touch fresh pages, and the kernel
zeroes each one at its first touch. On a virtual machine that costs about 10 µs a page: on the
CNN benchmark it was a third of an explain call's time, and which call paid depended on the
heap's history.

While ``scope()`` is open, torch's CPU allocator is this arena. Blocks of 1 MiB or more come
from freed blocks of the same size class (sizes rounded up to a sixteenth of their power of
two); smaller requests go to the allocator it replaced. A block freed later (an explanation
dropped after its call) comes back to the arena. Idle blocks are kept while a ``Backtrace``
holds the arena (``hold``), as long as the arena holds at most twice the most bytes it has had
in use at once; beyond that the oldest idle blocks go back to the system first. A block is only
allocated when its size class has no idle one, so with the same shapes call after call the
arena settles on what the busiest moment of each size class needs, and a call allocates nothing. When the last holder is collected, or on ``release()``,
every idle block goes back. The allocator only hands out memory: no value changes, and
``tests/test_arena.py`` checks that relevance has the same bits with and without it.

The engine opens the scope for inputs on the CPU only (a GPU's caching allocator already keeps
its blocks). The arena is C++ built against this torch's c10 (``native.library``). Without a C++
compiler, or with ``GOVERNANCE_ARENA=0`` (or ``GOVERNANCE_NATIVE=0``), ``scope`` does nothing and
torch's allocator serves every call.
"""

from __future__ import annotations

import ctypes
import os
import threading
import weakref
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

from . import native

_SOURCE = r"""
#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>
#include <c10/core/impl/alloc_cpu.h>
#include <c10/util/Exception.h>
#include <cstdint>
#include <cstdlib>
#include <map>
#include <mutex>
#include <unordered_map>

namespace {

struct Block {
  size_t size;      // bytes held (the size class)
  size_t asked;     // bytes asked for (reported to the profiler)
  uint64_t stamp;   // when it went idle (eviction order)
};

void arena_delete(void* p);

/* torch's CPU allocator while an explain call runs: large blocks kept and handed out again;
   small ones from the allocator it replaced. */
class Arena final : public c10::Allocator {
 public:
  std::mutex mu;
  std::unordered_map<void*, Block> blocks;   // every block the arena holds, idle or in use
  std::multimap<size_t, void*> idle;         // idle blocks by size
  std::map<uint64_t, void*> idle_age;        // idle blocks by the time they went idle
  c10::Allocator* prev = nullptr;
  const size_t min_bytes = size_t(1) << 20;
  size_t in_use = 0, held = 0, peak = 0;  // idle bytes: held - in_use
  uint64_t clock = 0, hits = 0, misses = 0, returned = 0;
  int holders = 0;

  static size_t size_class(size_t n) {
    const size_t page = 4096;
    size_t s = (n + page - 1) / page * page;
    size_t step = (size_t(1) << (63 - __builtin_clzll(s))) >> 4;
    if (step < page) step = page;
    return (s + step - 1) / step * step;
  }

  void drop_idle(std::multimap<size_t, void*>::iterator it) {  // mu held
    void* p = it->second;
    Block& b = blocks.at(p);
    idle_age.erase(b.stamp);
    held -= b.size;
    returned += b.size;
    idle.erase(it);
    blocks.erase(p);
    std::free(p);
  }

  void evict_until(size_t limit) {  // mu held: the oldest idle blocks go back first
    while (held - in_use > limit && !idle_age.empty()) {
      void* p = idle_age.begin()->second;
      size_t size = blocks.at(p).size;
      auto range = idle.equal_range(size);
      for (auto it = range.first; it != range.second; ++it)
        if (it->second == p) { drop_idle(it); break; }
    }
  }

  c10::DataPtr allocate(size_t n) override {
    if (n < min_bytes || n > (SIZE_MAX >> 2)) return prev->allocate(n);  // huge: prev says no
    const size_t want = size_class(n);
    void* p = nullptr;
    {
      std::lock_guard<std::mutex> g(mu);
      auto it = idle.find(want);
      if (it != idle.end()) {
        p = it->second;
        idle_age.erase(blocks.at(p).stamp);
        idle.erase(it);
        hits++;
      } else {
        misses++;
        if (posix_memalign(&p, 64, want) != 0) {
          evict_until(0);
          if (posix_memalign(&p, 64, want) != 0) p = nullptr;
        }
        TORCH_CHECK(p != nullptr, "not enough memory: tried to allocate ", n, " bytes");
        held += want;
      }
      blocks[p] = Block{want, n, 0};
      in_use += want;
      if (in_use > peak) peak = in_use;
    }
    c10::reportMemoryUsageToProfiler(p, static_cast<int64_t>(n), in_use, held,
                                     c10::Device(c10::DeviceType::CPU));
    return {p, p, &arena_delete, c10::Device(c10::DeviceType::CPU)};
  }

  void release(void* p) {
    size_t asked;
    {
      std::lock_guard<std::mutex> g(mu);
      auto it = blocks.find(p);
      if (it == blocks.end()) {  // not ours: a raw block of the allocator we replaced
        c10::DeleterFnPtr d = prev != nullptr ? prev->raw_deleter() : nullptr;
        if (d != nullptr) d(p); else c10::free_cpu(p);
        return;
      }
      Block& b = it->second;
      asked = b.asked;
      in_use -= b.size;
      if (holders > 0) {
        b.stamp = ++clock;
        idle.emplace(b.size, p);
        idle_age.emplace(b.stamp, p);
        evict_until(2 * peak - in_use);
      } else {
        held -= b.size;
        returned += b.size;
        blocks.erase(it);
        std::free(p);
      }
    }
    c10::reportMemoryUsageToProfiler(p, -static_cast<int64_t>(asked), in_use, held,
                                     c10::Device(c10::DeviceType::CPU));
  }

  void release_idle() {
    std::lock_guard<std::mutex> g(mu);
    evict_until(0);
    peak = in_use;
  }

  c10::DeleterFnPtr raw_deleter() const override { return &arena_delete; }
  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }
};

Arena* arena() {
  static Arena* a = new Arena();  // never destroyed: blocks may be freed at interpreter exit
  return a;
}
void arena_delete(void* p) { arena()->release(p); }
std::mutex scope_mu;
int depth = 0;

}  // namespace

extern "C" {
/* 1 when torch's CPU allocator is the arena until the matching arena_exit, 0 when it could not
   be installed (another allocator of higher priority); then arena_exit must not be called. */
int arena_enter() {
  std::lock_guard<std::mutex> g(scope_mu);
  Arena* a = arena();
  if (depth == 0) {
    c10::Allocator* current = c10::GetCPUAllocator();
    if (current != a) {
      a->prev = current;
      c10::SetCPUAllocator(a, 0);
      if (c10::GetCPUAllocator() != a) return 0;
    }
  }
  depth++;
  return 1;
}

void arena_exit() {
  std::lock_guard<std::mutex> g(scope_mu);
  if (depth > 0 && --depth == 0 && c10::GetCPUAllocator() == arena())
    c10::SetCPUAllocator(arena()->prev, 0);
}

/* holders + delta; with none left, every idle block goes back and later frees go straight back */
void arena_hold(int delta) {
  Arena* a = arena();
  bool none;
  {
    std::lock_guard<std::mutex> g(a->mu);
    a->holders += delta;
    none = a->holders <= 0;
  }
  if (none) a->release_idle();
}

void arena_release() { arena()->release_idle(); }

void arena_stats(int64_t* out) {
  Arena* a = arena();
  std::lock_guard<std::mutex> g(a->mu);
  out[0] = a->in_use; out[1] = a->held; out[2] = a->peak; out[3] = a->held - a->in_use;
  out[4] = a->hits; out[5] = a->misses; out[6] = a->returned; out[7] = a->holders;
}
}
"""

_holding = threading.Lock()
_SIGNATURES = {"arena_enter": ([], ctypes.c_int), "arena_exit": [], "arena_hold": [ctypes.c_int],
               "arena_release": [], "arena_stats": [ctypes.c_void_p]}


@dataclass(frozen=True)
class ArenaStats:
    """Bytes the arena holds (in use by tensors, idle, their peak) and its counts of blocks
    handed out again (hits), newly allocated (misses), and bytes given back to the system."""

    in_use: int
    held: int
    peak: int
    idle: int
    hits: int
    misses: int
    returned: int
    holders: int


def _library() -> ctypes.CDLL | None:
    if os.environ.get("GOVERNANCE_ARENA", "1") == "0":
        return None
    return native.library(_SOURCE, _SIGNATURES, cxx=True)


def available() -> bool:
    """Whether the arena is built here and switched on."""
    return _library() is not None


@contextmanager
def scope(on: bool = True) -> Iterator[bool]:
    """torch's CPU allocator is the arena inside (True), or unchanged (False: ``on`` false, the
    arena off or unavailable). Nested and concurrent scopes share one installation."""
    lib = _library() if on else None
    entered = bool(lib is not None and lib.arena_enter())
    try:
        yield entered
    finally:
        if entered:
            lib.arena_exit()


def hold(owner: object) -> None:
    """Keep idle blocks while ``owner`` (a ``Backtrace``) lives; once every owner is collected,
    the idle blocks go back to the system."""
    lib = _library()
    if lib is None or getattr(owner, "_arena_hold", None) is not None:
        return
    with _holding:
        if getattr(owner, "_arena_hold", None) is None:
            lib.arena_hold(1)
            owner._arena_hold = weakref.finalize(owner, lib.arena_hold, -1)


def release() -> None:
    """Give every idle block back to the system now (blocks in use stay)."""
    lib = _library()
    if lib is not None:
        lib.arena_release()


def stats() -> ArenaStats | None:
    """The arena's counters, or None where it is not available."""
    lib = _library()
    if lib is None:
        return None
    out = (ctypes.c_int64 * 8)()
    lib.arena_stats(out)
    return ArenaStats(*out)
