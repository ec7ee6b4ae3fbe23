// Splitting a kernel over threads without ever losing a part or a thread.
// Internal to the extension.
#pragma once

#include <cstddef>
#include <new>
#include <system_error>
#include <thread>
#include <vector>

namespace fedge {

// Runs part(0) .. part(n_parts - 1): part 0 on the calling thread, the others
// on threads of their own. A thread the system refuses to start (a cgroup's
// pids.max, RLIMIT_NPROC, no address space left for its stack) is not an
// error: that part and the ones after it run on the calling thread instead,
// so the result is the same, only later. Every thread started is joined
// before this returns, also when a part throws: a joinable std::thread left
// to its destructor would std::terminate the process.
template <typename Part>
void run_parts(size_t n_parts, const Part& part) {
  struct Joiner {
    std::vector<std::thread> threads;
    ~Joiner() {
      for (auto& t : threads) {
        if (t.joinable()) t.join();
      }
    }
  } pool;
  size_t started_up_to = 1;  // parts [1, started_up_to) run on their own threads
  if (n_parts > 1) {
    try {
      pool.threads.reserve(n_parts - 1);
      for (size_t i = 1; i < n_parts; ++i) {
        pool.threads.emplace_back([&part, i] { part(i); });
        started_up_to = i + 1;
      }
    } catch (const std::system_error&) {
      // pthread_create failed (EAGAIN): run the rest here.
    } catch (const std::bad_alloc&) {
      // no memory for the thread's state or the vector: run the rest here.
    }
  }
  part(0);
  for (size_t i = started_up_to; i < n_parts; ++i) part(i);
}

}  // namespace fedge
