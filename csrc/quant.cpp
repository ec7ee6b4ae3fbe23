#include "quant.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include <immintrin.h>

#include "parallel.h"
#include "prg.h"

namespace fedge {
namespace {

constexpr size_t kChunkWords = 2048;
constexpr size_t kMinWordsPerThread = 1 << 16;

bool cpu_has_avx2() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2");
}

bool quantise_range(Path path, const float* x, size_t n, size_t first, double clip, double scale,
                    uint32_t qmax, const RoundKeys& seed, uint32_t* out) {
  alignas(64) uint32_t u[kChunkWords];
  // The arithmetic follows the PRG path: portable -> scalar, aesni -> AVX2
  // (when present), vaes256 -> AVX2, vaes -> AVX-512 (implies AVX-512F).
  auto words = quantise_words;
  if (path == Path::vaes) {
    words = quantise_words_avx512;
  } else if (path == Path::vaes256 || (path == Path::aesni && cpu_has_avx2())) {
    words = quantise_words_avx2;
  }
  bool finite = true;
  for (size_t c = 0; c < n; c += kChunkWords) {
    const size_t cnt = std::min(kChunkWords, n - c);
    keystream(path, seed, first + c, u, cnt);
    finite &= words(x + c, u, cnt, clip, scale, qmax, out + c);
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

bool quantise_words(const float* x, const uint32_t* u, size_t n, double clip, double scale,
                    uint32_t qmax, uint32_t* out) {
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

// The vector versions do the same IEEE operations in the same order on 4 or
// 8 lanes (max/min equal the scalar selects for every non-NaN input; NaN
// input is reported and its output is unspecified), so all three agree bit
// for bit; the tests check it on every path.
__attribute__((target("avx2"))) bool quantise_words_avx2(const float* x, const uint32_t* u,
                                                         size_t n, double clip, double scale,
                                                         uint32_t qmax, uint32_t* out) {
  const __m256d c = _mm256_set1_pd(clip), nc = _mm256_set1_pd(-clip), s = _mm256_set1_pd(scale);
  const __m256d top = _mm256_set1_pd(static_cast<double>(qmax));
  const __m256d two32 = _mm256_set1_pd(0x1p-32), half = _mm256_set1_pd(0x1p31);
  const __m128i expo = _mm_set1_epi32(0x7f800000), flip = _mm_set1_epi32(INT32_MIN);
  __m128i bad = _mm_setzero_si128();
  size_t i = 0;
  for (; i + 4 <= n; i += 4) {
    const __m128 xf = _mm_loadu_ps(x + i);
    bad = _mm_or_si128(bad, _mm_cmpeq_epi32(_mm_and_si128(_mm_castps_si128(xf), expo), expo));
    __m256d v = _mm256_cvtps_pd(xf);
    v = _mm256_min_pd(_mm256_max_pd(v, nc), c);
    // uint32 -> double, exactly: (int32)(u ^ 2^31) + 2^31
    const __m128i uw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(u + i));
    const __m256d ud = _mm256_add_pd(_mm256_cvtepi32_pd(_mm_xor_si128(uw, flip)), half);
    const __m256d y = _mm256_add_pd(_mm256_mul_pd(_mm256_add_pd(v, c), s), _mm256_mul_pd(ud, two32));
    const __m256d f = _mm256_min_pd(_mm256_round_pd(y, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC), top);
    // f <= qmax <= 2^31 - 1: the signed conversion is exact
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out + i), _mm256_cvttpd_epi32(f));
  }
  const bool tail_ok = quantise_words(x + i, u + i, n - i, clip, scale, qmax, out + i);
  return tail_ok && _mm_movemask_epi8(bad) == 0;
}

namespace {

// Eight lanes of the formula. u * 2^-32 is exact, so the fused multiply-add
// rounds once exactly like the scalar add; the floor is the conversion's own
// rounding mode, and the cap at qmax is applied to the (<= 2^31) integer.
__attribute__((target("avx2,avx512f"))) inline __m256i quantise8_avx512(
    __m256 xf, __m256i uw, __m512d nc, __m512d c, __m512d s, __m512d two32, __m256i top) {
  __m512d v = _mm512_min_pd(_mm512_max_pd(_mm512_cvtps_pd(xf), nc), c);
  const __m512d w = _mm512_mul_pd(_mm512_add_pd(v, c), s);
  const __m512d y = _mm512_fmadd_pd(_mm512_cvtepu32_pd(uw), two32, w);
  const __m256i f = _mm512_cvt_roundpd_epu32(y, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
  return _mm256_min_epu32(f, top);
}

}  // namespace

__attribute__((target("avx2,avx512f"))) bool quantise_words_avx512(
    const float* x, const uint32_t* u, size_t n, double clip, double scale, uint32_t qmax,
    uint32_t* out) {
  const __m512d c = _mm512_set1_pd(clip), nc = _mm512_set1_pd(-clip), s = _mm512_set1_pd(scale);
  const __m512d two32 = _mm512_set1_pd(0x1p-32);
  const __m256i top = _mm256_set1_epi32(static_cast<int>(qmax));
  const __m512i expo = _mm512_set1_epi32(0x7f800000);
  __mmask16 bad = 0;
  size_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m512 xf = _mm512_loadu_ps(x + i);
    const __m512i xi = _mm512_castps_si512(xf);
    bad = static_cast<__mmask16>(bad | _mm512_cmpeq_epi32_mask(_mm512_and_si512(xi, expo), expo));
    const __m256 lo = _mm512_castps512_ps256(xf);
    const __m256 hi = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(xf), 1));
    const auto* ui = reinterpret_cast<const __m256i*>(u + i);
    auto* oi = reinterpret_cast<__m256i*>(out + i);
    const __m256i q0 = quantise8_avx512(lo, _mm256_loadu_si256(ui), nc, c, s, two32, top);
    const __m256i q1 = quantise8_avx512(hi, _mm256_loadu_si256(ui + 1), nc, c, s, two32, top);
    _mm256_storeu_si256(oi, q0);
    _mm256_storeu_si256(oi + 1, q1);
  }
  const bool tail_ok = quantise_words(x + i, u + i, n - i, clip, scale, qmax, out + i);
  return tail_ok && bad == 0;
}

bool quantise(Path path, const float* x, size_t n, double clip, int bits, const RoundKeys& seed,
              uint32_t* out, int threads) {
  const double scale = quant_scale(bits, clip);
  const uint32_t qmax = static_cast<uint32_t>((uint64_t(1) << bits) - 1);
  size_t t = static_cast<size_t>(std::max(threads, 1));
  t = std::max<size_t>(1, std::min(t, n / kMinWordsPerThread));
  if (t == 1) return quantise_range(path, x, n, 0, clip, scale, qmax, seed, out);
  const size_t per = ((n + t - 1) / t + 3) & ~size_t(3);
  const size_t n_parts = (n + per - 1) / per;
  std::vector<char> ok(n_parts, 1);
  run_parts(n_parts, [&](size_t i) {
    const size_t a = i * per;
    ok[i] = quantise_range(path, x + a, std::min(per, n - a), a, clip, scale, qmax, seed, out + a);
  });
  return std::all_of(ok.begin(), ok.end(), [](char v) { return v != 0; });
}

void dequantise(const uint32_t* total, size_t n, uint64_t n_summands, double clip, int bits,
                double* out) {
  const double scale = quant_scale(bits, clip);
  const double shift = static_cast<double>(n_summands) * clip;
  for (size_t i = 0; i < n; ++i) out[i] = static_cast<double>(total[i]) / scale - shift;
}

}  // namespace fedge
