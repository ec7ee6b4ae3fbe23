// AES-128-CTR with AES-NI: eight independent blocks per iteration hide the
// four-cycle latency of AESENC. The counter lives in the low 64-bit lane as a
// native integer and is byte-reversed into the big-endian counter block.
#include <immintrin.h>

#include "aes.h"

#define FEDGE_TARGET_AESNI __attribute__((target("aes,ssse3")))

namespace fedge {
namespace {

template <Op op>
FEDGE_TARGET_AESNI inline void apply_words(uint32_t* dst, __m128i ks) {
  __m128i* p = reinterpret_cast<__m128i*>(dst);
  if constexpr (op == Op::store) {
    _mm_storeu_si128(p, ks);
  } else if constexpr (op == Op::add) {
    _mm_storeu_si128(p, _mm_add_epi32(_mm_loadu_si128(p), ks));
  } else {
    _mm_storeu_si128(p, _mm_sub_epi32(_mm_loadu_si128(p), ks));
  }
}

template <Op op>
FEDGE_TARGET_AESNI void ctr_aesni_impl(const RoundKeys& keys, uint64_t iv_hi, uint64_t block0, size_t nblocks,
                                       uint32_t* dst) {
  __m128i k[11];
  for (int r = 0; r < 11; ++r) {
    k[r] = _mm_load_si128(reinterpret_cast<const __m128i*>(keys.bytes + 16 * r));
  }
  const __m128i bswap = _mm_set_epi8(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  __m128i ctr = _mm_set_epi64x(static_cast<long long>(iv_hi), static_cast<long long>(block0));
  size_t i = 0;
  for (; i + 8 <= nblocks; i += 8) {
    __m128i b[8];
    for (int j = 0; j < 8; ++j) {
      b[j] = _mm_xor_si128(_mm_shuffle_epi8(_mm_add_epi64(ctr, _mm_set_epi64x(0, j)), bswap), k[0]);
    }
    ctr = _mm_add_epi64(ctr, _mm_set_epi64x(0, 8));
    for (int r = 1; r < 10; ++r) {
      for (int j = 0; j < 8; ++j) b[j] = _mm_aesenc_si128(b[j], k[r]);
    }
    for (int j = 0; j < 8; ++j) {
      apply_words<op>(dst + 4 * (i + j), _mm_aesenclast_si128(b[j], k[10]));
    }
  }
  for (; i < nblocks; ++i) {
    __m128i b = _mm_xor_si128(_mm_shuffle_epi8(ctr, bswap), k[0]);
    ctr = _mm_add_epi64(ctr, _mm_set_epi64x(0, 1));
    for (int r = 1; r < 10; ++r) b = _mm_aesenc_si128(b, k[r]);
    apply_words<op>(dst + 4 * i, _mm_aesenclast_si128(b, k[10]));
  }
}

}  // namespace

void ctr_aesni(const RoundKeys& keys, Op op, uint64_t iv_hi, uint64_t block0, size_t nblocks,
               uint32_t* dst) {
  switch (op) {
    case Op::store:
      return ctr_aesni_impl<Op::store>(keys, iv_hi, block0, nblocks, dst);
    case Op::add:
      return ctr_aesni_impl<Op::add>(keys, iv_hi, block0, nblocks, dst);
    case Op::sub:
      return ctr_aesni_impl<Op::sub>(keys, iv_hi, block0, nblocks, dst);
  }
}

}  // namespace fedge
