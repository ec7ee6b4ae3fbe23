// AES-128 in counter mode, exactly OpenSSL's EVP_aes_128_ctr with a zero IV:
// block j of the keystream is AES_k(j as a 128-bit big-endian integer), and the
// PRG reads the keystream as little-endian uint32 words.
//
// Three implementations of the same function, chosen at run time:
//   portable  table-driven AES, any CPU
//   aesni     AES-NI, 8 blocks in flight (128-bit registers)
//   vaes256   VAES on 256-bit registers (no AVX-512), 16 blocks in flight
//   vaes      VAES + AVX-512, 32 blocks in flight (4 blocks per register)
#pragma once

#include <cstddef>
#include <cstdint>

namespace fedge {

// The expanded key: 11 round keys of 16 bytes, in FIPS-197 byte order (the
// order AESENC expects when loaded from memory).
struct RoundKeys {
  alignas(16) uint8_t bytes[176];
};

RoundKeys expand_key(const uint8_t key[16]);

enum class Path : int { portable = 0, aesni = 1, vaes256 = 2, vaes = 3 };

// What a kernel does with each keystream word w at dst[i]:
//   store: dst[i] = w;   add: dst[i] += w (mod 2^32);   sub: dst[i] -= w.
enum class Op : int { store = 0, add = 1, sub = 2 };

// Applies counter blocks (iv_hi, block0) .. (iv_hi, block0 + nblocks - 1) of
// one key's keystream to dst, which holds 4 * nblocks words. A counter block
// is the 16 bytes big-endian(iv_hi) || big-endian(low). The low half must not
// wrap (block0 + nblocks <= 2^64); the PRG uses iv_hi = 0, and a non-zero
// iv_hi exists so that the NIST SP 800-38A vectors can be run on every path.
using CtrKernel = void (*)(const RoundKeys& keys, Op op, uint64_t iv_hi, uint64_t block0,
                           size_t nblocks, uint32_t* dst);

void ctr_portable(const RoundKeys& keys, Op op, uint64_t iv_hi, uint64_t block0, size_t nblocks,
                  uint32_t* dst);
void ctr_aesni(const RoundKeys& keys, Op op, uint64_t iv_hi, uint64_t block0, size_t nblocks,
               uint32_t* dst);
void ctr_vaes256(const RoundKeys& keys, Op op, uint64_t iv_hi, uint64_t block0, size_t nblocks,
                 uint32_t* dst);
void ctr_vaes(const RoundKeys& keys, Op op, uint64_t iv_hi, uint64_t block0, size_t nblocks,
              uint32_t* dst);

// One AES-128 block encryption (portable); used by the known-answer tests.
void encrypt_block_portable(const RoundKeys& keys, const uint8_t in[16], uint8_t out[16]);

}  // namespace fedge
