// AES-128-CTR with VAES on 512-bit registers: each register carries four
// counter blocks and eight registers are in flight (32 blocks, 512 bytes per
// iteration). Compiled with function-level target attributes only, so the
// rest of the module still runs on any x86-64; called only after the run-time
// check in prg.cpp.
#include <immintrin.h>

#include "aes.h"

#define FEDGE_TARGET_VAES __attribute__((target("aes,ssse3,avx2,avx512f,avx512bw,vaes")))

namespace fedge {
namespace {

template <Op op>
FEDGE_TARGET_VAES inline void apply_zmm(uint32_t* dst, __m512i ks) {
  if constexpr (op == Op::store) {
    _mm512_storeu_si512(dst, ks);
  } else if constexpr (op == Op::add) {
    _mm512_storeu_si512(dst, _mm512_add_epi32(_mm512_loadu_si512(dst), ks));
  } else {
    _mm512_storeu_si512(dst, _mm512_sub_epi32(_mm512_loadu_si512(dst), ks));
  }
}

template <Op op>
FEDGE_TARGET_VAES inline void apply_xmm(uint32_t* dst, __m128i ks) {
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
FEDGE_TARGET_VAES void ctr_vaes_impl(const RoundKeys& keys, uint64_t iv_hi, uint64_t block0, size_t nblocks,
                                     uint32_t* dst) {
  constexpr int kRegs = 8;
  __m512i k[11];
  __m128i k1[11];
  for (int r = 0; r < 11; ++r) {
    k1[r] = _mm_load_si128(reinterpret_cast<const __m128i*>(keys.bytes + 16 * r));
    k[r] = _mm512_broadcast_i32x4(k1[r]);
  }
  const __m128i bswap128 = _mm_set_epi8(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const __m512i bswap = _mm512_broadcast_i32x4(bswap128);
  auto lane = [block0](uint64_t j) { return static_cast<long long>(block0 + j); };
  const long long hi = static_cast<long long>(iv_hi);
  // lanes (low 64 bits of each 128-bit block): b0, b0+1, b0+2, b0+3
  __m512i ctr = _mm512_set_epi64(hi, lane(3), hi, lane(2), hi, lane(1), hi, lane(0));
  const __m512i four = _mm512_set_epi64(0, 4, 0, 4, 0, 4, 0, 4);
  size_t i = 0;
  for (; i + 4 * kRegs <= nblocks; i += 4 * kRegs) {
    __m512i b[kRegs];
    for (int j = 0; j < kRegs; ++j) {
      b[j] = _mm512_xor_si512(_mm512_shuffle_epi8(ctr, bswap), k[0]);
      ctr = _mm512_add_epi64(ctr, four);
    }
    for (int r = 1; r < 10; ++r) {
      for (int j = 0; j < kRegs; ++j) b[j] = _mm512_aesenc_epi128(b[j], k[r]);
    }
    for (int j = 0; j < kRegs; ++j) {
      apply_zmm<op>(dst + 4 * i + 16 * j, _mm512_aesenclast_epi128(b[j], k[10]));
    }
  }
  for (; i + 4 <= nblocks; i += 4) {
    __m512i b = _mm512_xor_si512(_mm512_shuffle_epi8(ctr, bswap), k[0]);
    ctr = _mm512_add_epi64(ctr, four);
    for (int r = 1; r < 10; ++r) b = _mm512_aesenc_epi128(b, k[r]);
    apply_zmm<op>(dst + 4 * i, _mm512_aesenclast_epi128(b, k[10]));
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

void ctr_vaes(const RoundKeys& keys, Op op, uint64_t iv_hi, uint64_t block0, size_t nblocks,
               uint32_t* dst) {
  switch (op) {
    case Op::store:
      return ctr_vaes_impl<Op::store>(keys, iv_hi, block0, nblocks, dst);
    case Op::add:
      return ctr_vaes_impl<Op::add>(keys, iv_hi, block0, nblocks, dst);
    case Op::sub:
      return ctr_vaes_impl<Op::sub>(keys, iv_hi, block0, nblocks, dst);
  }
}

}  // namespace fedge
