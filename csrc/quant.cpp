#include "quant.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <thread>
#include <vector>

#include "prg.h"

namespace fedge {
namespace {

constexpr size_t kChunkWords = 2048;
constexpr size_t kMinWordsPerThread = 1 << 16;

bool quantise_range(Path path, const float* x, size_t n, size_t first, double clip, double scale,
                    uint32_t qmax, const RoundKeys& seed, uint32_t* out) {
  alignas(64) uint32_t u[kChunkWords];
  bool finite = true;
  for (size_t c = 0; c < n; c += kChunkWords) {
    const size_t cnt = std::min(kChunkWords, n - c);
    keystream(path, seed, first + c, u, cnt);
    finite &= quantise_words(x + c, u, cnt, clip, scale, qmax, out + c);
  }
  return finite;
}

}  // namespace

double quant_scale(int bits, double clip) {
  return static_cast<double>((uint64_t(1) << bits) - 1) / (2.0 * clip);
}

int quant_bits(uint64_t n_summands) {
  if (n_summands == 0) return 0;
  const uint64_t limit = 0xFFFFFFFFull;
  for (int b = 31; b >= 1; --b) {
    const uint64_t top = (uint64_t(1) << b) - 1;
    if (n_summands <= limit / top) return b;
  }
  return 0;
}

// Compiled three times and chosen by the loader (ifunc): the arithmetic is
// the same IEEE operations in every clone, only the vector width differs.
__attribute__((target_clones("avx512f", "avx2", "default"))) bool quantise_words(
    const float* x, const uint32_t* u, size_t n, double clip, double scale, uint32_t qmax,
    uint32_t* out) {
  uint32_t bad = 0;
  const double top = static_cast<double>(qmax);
  for (size_t i = 0; i < n; ++i) {
    uint32_t bits;
    std::memcpy(&bits, x + i, sizeof bits);
    bad |= static_cast<uint32_t>((bits & 0x7f800000u) == 0x7f800000u);
    double v = static_cast<double>(x[i]);
    v = v < -clip ? -clip : v;
    v = v > clip ? clip : v;
    const double y = (v + clip) * scale + static_cast<double>(u[i]) * 0x1p-32;
    double f = std::floor(y);
    f = f < top ? f : top;  // also maps NaN (rejected by the caller) to a defined value
    out[i] = static_cast<uint32_t>(static_cast<int64_t>(f));
  }
  return bad == 0;
}

bool quantise(Path path, const float* x, size_t n, double clip, int bits, const RoundKeys& seed,
              uint32_t* out, int threads) {
  const double scale = quant_scale(bits, clip);
  const uint32_t qmax = static_cast<uint32_t>((uint64_t(1) << bits) - 1);
  size_t t = static_cast<size_t>(std::max(threads, 1));
  t = std::max<size_t>(1, std::min(t, n / kMinWordsPerThread));
  if (t == 1) return quantise_range(path, x, n, 0, clip, scale, qmax, seed, out);
  std::vector<std::thread> pool;
  std::vector<char> ok(t, 1);
  const size_t per = ((n + t - 1) / t + 3) & ~size_t(3);
  for (size_t i = 1; i < t; ++i) {
    const size_t a = i * per;
    if (a >= n) break;
    const size_t cnt = std::min(per, n - a);
    pool.emplace_back([&, i, a, cnt] {
      ok[i] = quantise_range(path, x + a, cnt, a, clip, scale, qmax, seed, out + a);
    });
  }
  ok[0] = quantise_range(path, x, std::min(per, n), 0, clip, scale, qmax, seed, out);
  for (auto& th : pool) th.join();
  return std::all_of(ok.begin(), ok.end(), [](char v) { return v != 0; });
}

void dequantise(const uint32_t* total, size_t n, uint64_t n_summands, double clip, int bits,
                double* out) {
  const double scale = quant_scale(bits, clip);
  const double shift = static_cast<double>(n_summands) * clip;
  for (size_t i = 0; i < n; ++i) out[i] = static_cast<double>(total[i]) / scale - shift;
}

}  // namespace fedge
