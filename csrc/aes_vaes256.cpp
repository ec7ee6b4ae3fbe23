// AES-128-CTR with VAES on 256-bit registers, for CPUs with VAES but no
// AVX-512 (AMD Zen 3, Intel Alder Lake): each register carries two counter
// blocks and eight registers are in flight (16 blocks, 256 bytes per
// iteration). Function-level target attributes only; called only after the
// run-time check in prg.cpp.
#include <immintrin.h>

#include "aes.h"

#define FEDGE_TARGET_VAES256 __attribute__((target("aes,ssse3,avx2,vaes")))

namespace fedge {
namespace {

template <Op op>
FEDGE_TARGET_VAES256 inline void apply_ymm(uint32_t* dst, __m256i ks) {
  if constexpr (op == Op::store) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst), ks);
  } else if constexpr (op == Op::add) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst),
                        _mm256_add_epi32(_mm256_loadu_si256(reinterpret_cast<__m256i*>(dst)), ks));
  } else {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst),
                        _mm256_sub_epi32(_mm256_loadu_si256(reinterpret_cast<__m256i*>(dst)), ks));
  }
}

template <Op op>
FEDGE_TARGET_VAES256 inline void apply_xmm(uint32_t* dst, __m128i ks) {
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
FEDGE_TARGET_VAES256 void ctr_vaes256_impl(const RoundKeys& keys, uint64_t iv_hi, uint64_t block0, size_t nblocks,
                                     uint32_t* dst) {
  constexpr int kRegs = 8;
  __m256i k[11];
  __m128i k1[11];
  for (int r = 0; r < 11; ++r) {
    k1[r] = _mm_load_si128(reinterpret_cast<const __m128i*>(keys.bytes + 16 * r));
    k[r] = _mm256_broadcastsi128_si256(k1[r]);
  }
  const __m128i bswap128 = _mm_set_epi8(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const __m256i bswap = _mm256_broadcastsi128_si256(bswap128);
  auto lane = [block0](uint64_t j) { return static_cast<long long>(block0 + j); };
  const long long hi = static_cast<long long>(iv_hi);
  // lanes (low 64 bits of each 128-bit block): b0, b0+1
  __m256i ctr = _mm256_set_epi64x(hi, lane(1), hi, lane(0));
  const __m256i two = _mm256_set_epi64x(0, 2, 0, 2);
  size_t i = 0;
  for (; i + 2 * kRegs <= nblocks; i += 2 * kRegs) {
    __m256i b[kRegs];
    for (int j = 0; j < kRegs; ++j) {
      b[j] = _mm256_xor_si256(_mm256_shuffle_epi8(ctr, bswap), k[0]);
      ctr = _mm256_add_epi64(ctr, two);
    }
    for (int r = 1; r < 10; ++r) {
      for (int j = 0; j < kRegs; ++j) b[j] = _mm256_aesenc_epi128(b[j], k[r]);
    }
    for (int j = 0; j < kRegs; ++j) {
      apply_ymm<op>(dst + 4 * i + 8 * j, _mm256_aesenclast_epi128(b[j], k[10]));
    }
  }
  for (; i + 2 <= nblocks; i += 2) {
    __m256i b = _mm256_xor_si256(_mm256_shuffle_epi8(ctr, bswap), k[0]);
    ctr = _mm256_add_epi64(ctr, two);
    for (int r = 1; r < 10; ++r) b = _mm256_aesenc_epi128(b, k[r]);
    apply_ymm<op>(dst + 4 * i, _mm256_aesenclast_epi128(b, k[10]));
  }
  __m128i c1 = _mm_set_epi64x(hi, lane(i));
  for (; i < nblocks; ++i) {
    __m128i b = _mm_xor_si128(_mm_shuffle_epi8(c1, bswap128), k1[0]);
    c1 = _mm_add_epi64(c1, _mm_set_epi64x(0, 1));
    for (int r = 1; r < 10; ++r) b = _mm_aesenc_si128(b, k1[r]);
    apply_xmm<op>(dst + 4 * i, _mm_aesenclast_si128(b, k1[10]));
  }
}

}  // namespace

void ctr_vaes256(const RoundKeys& keys, Op op, uint64_t iv_hi, uint64_t block0, size_t nblocks,
               uint32_t* dst) {
  switch (op) {
    case Op::store:
      return ctr_vaes256_impl<Op::store>(keys, iv_hi, block0, nblocks, dst);
    case Op::add:
      return ctr_vaes256_impl<Op::add>(keys, iv_hi, block0, nblocks, dst);
    case Op::sub:
      return ctr_vaes256_impl<Op::sub>(keys, iv_hi, block0, nblocks, dst);
  }
}

}  // namespace fedge
