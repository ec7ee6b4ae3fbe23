// A small pool of large result buffers, so a call that returns a fresh array
// every round (quantise in the SecAgg client) writes into pages that are
// already mapped instead of pages the kernel must fault in and zero. At 1e7
// words that zeroing is about 0.5 ns a word, as much as the quantise itself.
//
// A buffer goes back to the pool when the last numpy array over it dies (the
// array's base is a capsule), never while anything still views it. The pool
// keeps at most kMaxBuffers buffers and kMaxBytes in all, dropping the oldest
// first; release() hands every kept buffer back to the system. A buffer lent
// out as an array is reported to tracemalloc (as numpy reports its own), so
// memory measured with tracemalloc still counts it. Internal to the extension;
// header-only.
#pragma once

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <deque>
#include <mutex>
#include <new>
#include <utility>

#include <sys/mman.h>

// Python 3.11's tracemalloc.h declares these without extern "C", which gives
// them C++ linkage here; name the C symbols directly instead.
extern "C" int fedge_trace_track(unsigned int domain, uintptr_t ptr, size_t size) __asm__(
    "PyTraceMalloc_Track");
extern "C" int fedge_trace_untrack(unsigned int domain, uintptr_t ptr) __asm__(
    "PyTraceMalloc_Untrack");

namespace fedge::bind {

class OutPool {
 public:
  static constexpr size_t kMinBytes = size_t{1} << 20;   // below this malloc already reuses
  static constexpr size_t kMaxBuffers = 4;
  static constexpr size_t kMaxBytes = size_t{512} << 20;
  static constexpr size_t kAlign = 64;
  static constexpr unsigned int kTraceDomain = 0x66656467;  // "fedg"

  static OutPool& instance() {
    static OutPool* pool = new OutPool();  // never destroyed: capsules may outlive exit order
    return *pool;
  }

  // A buffer of exactly `bytes` (kept or new), 64-byte aligned, uninitialised.
  void* take(size_t bytes) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      for (auto it = kept_.begin(); it != kept_.end(); ++it) {
        if (it->second == bytes) {
          void* p = it->first;
          kept_bytes_ -= bytes;
          kept_.erase(it);
          ++reused_;
          return p;
        }
      }
    }
    void* p = std::aligned_alloc(kAlign, round_up(bytes));
    if (p == nullptr) throw std::bad_alloc();
    advise_huge(p, bytes);
    return p;
  }

  // Back into the pool (or to the system when it would not fit).
  void give(void* p, size_t bytes) {
    std::lock_guard<std::mutex> lock(mu_);
    if (bytes > kMaxBytes) {
      std::free(p);
      return;
    }
    while (!kept_.empty() && (kept_.size() >= kMaxBuffers || kept_bytes_ + bytes > kMaxBytes)) {
      std::free(kept_.front().first);
      kept_bytes_ -= kept_.front().second;
      kept_.pop_front();
    }
    kept_.emplace_back(p, bytes);
    kept_bytes_ += bytes;
  }

  void release() {
    std::lock_guard<std::mutex> lock(mu_);
    for (auto& [p, bytes] : kept_) std::free(p);
    kept_.clear();
    kept_bytes_ = 0;
  }

  pybind11::dict stats() {
    std::lock_guard<std::mutex> lock(mu_);
    pybind11::dict d;
    d["buffers"] = kept_.size();
    d["bytes"] = kept_bytes_;
    d["reused"] = reused_;
    d["max_buffers"] = kMaxBuffers;
    d["max_bytes"] = kMaxBytes;
    d["min_bytes"] = kMinBytes;
    return d;
  }

 private:
  static size_t round_up(size_t bytes) { return (bytes + kAlign - 1) / kAlign * kAlign; }

  // Transparent huge pages for a new large buffer, as numpy asks for its own
  // arrays of 4 MiB or more: one fault per 2 MiB instead of per 4 KiB. Advice
  // only; ignored where the kernel has THP off.
  static void advise_huge(void* p, size_t bytes) {
#ifdef MADV_HUGEPAGE
    if (bytes < (size_t{1} << 22)) return;
    const auto start = reinterpret_cast<uintptr_t>(p);
    const uintptr_t page = 4096;
    const uintptr_t first = (start + page - 1) / page * page;
    if (first - start < bytes) {
      madvise(reinterpret_cast<void*>(first), bytes - (first - start), MADV_HUGEPAGE);
    }
#else
    (void)p;
    (void)bytes;
#endif
  }

  std::mutex mu_;
  std::deque<std::pair<void*, size_t>> kept_;
  size_t kept_bytes_ = 0;
  uint64_t reused_ = 0;
};

// What a pooled array's capsule owns: the buffer and its size.
struct PooledBuffer {
  void* p;
  size_t bytes;
};

// A fresh 1-D array of n T's: from the pool when large enough, else numpy's own.
template <typename T>
pybind11::array_t<T> pooled_array(size_t n) {
  namespace py = pybind11;
  const size_t bytes = n * sizeof(T);
  if (bytes < OutPool::kMinBytes) return py::array_t<T>(static_cast<py::ssize_t>(n));
  OutPool& pool = OutPool::instance();
  void* p = pool.take(bytes);
  PooledBuffer* owner;
  try {
    owner = new PooledBuffer{p, bytes};
  } catch (...) {
    pool.give(p, bytes);
    throw;
  }
  py::capsule base(owner, [](void* o) {
    auto* own = static_cast<PooledBuffer*>(o);
    fedge_trace_untrack(OutPool::kTraceDomain, reinterpret_cast<uintptr_t>(own->p));
    OutPool::instance().give(own->p, own->bytes);
    delete own;
  });
  fedge_trace_track(OutPool::kTraceDomain, reinterpret_cast<uintptr_t>(p), bytes);
  return py::array_t<T>({static_cast<py::ssize_t>(n)}, {static_cast<py::ssize_t>(sizeof(T))},
                        static_cast<T*>(owner->p), base);
}

}  // namespace fedge::bind
