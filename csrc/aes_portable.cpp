// Portable AES-128: the classic four T-table formulation (Daemen & Rijmen's
// reference "fst" code), tables derived at start-up from the S-box, which is
// itself computed from its definition (inverse in GF(2^8) + affine map), so no
// 256-entry constant can be mistyped. Used only on CPUs without AES-NI.
#include <cstring>

#include "aes.h"

namespace fedge {
namespace {

uint8_t gf_mul(uint8_t a, uint8_t b) {
  uint8_t p = 0;
  for (int i = 0; i < 8; ++i) {
    if (b & 1) p ^= a;
    const bool hi = (a & 0x80) != 0;
    a = static_cast<uint8_t>(a << 1);
    if (hi) a ^= 0x1b;
    b >>= 1;
  }
  return p;
}

uint8_t rotl8(uint8_t x, int s) { return static_cast<uint8_t>((x << s) | (x >> (8 - s))); }

struct Tables {
  uint8_t sbox[256];
  uint32_t te[4][256];
  Tables() {
    for (int x = 0; x < 256; ++x) {
      // inverse = x^254 (0 maps to 0)
      uint8_t inv = 1, base = static_cast<uint8_t>(x);
      for (int e = 254; e; e >>= 1) {
        if (e & 1) inv = gf_mul(inv, base);
        base = gf_mul(base, base);
      }
      if (x == 0) inv = 0;
      sbox[x] = static_cast<uint8_t>(inv ^ rotl8(inv, 1) ^ rotl8(inv, 2) ^ rotl8(inv, 3) ^
                                     rotl8(inv, 4) ^ 0x63);
    }
    for (int x = 0; x < 256; ++x) {
      const uint32_t s = sbox[x], s2 = gf_mul(sbox[x], 2), s3 = gf_mul(sbox[x], 3);
      te[0][x] = (s2 << 24) | (s << 16) | (s << 8) | s3;
      te[1][x] = (s3 << 24) | (s2 << 16) | (s << 8) | s;
      te[2][x] = (s << 24) | (s3 << 16) | (s2 << 8) | s;
      te[3][x] = (s << 24) | (s << 16) | (s3 << 8) | s2;
    }
  }
};

const Tables& tables() {
  static const Tables t;
  return t;
}

uint32_t load_be32(const uint8_t* p) {
  return (uint32_t(p[0]) << 24) | (uint32_t(p[1]) << 16) | (uint32_t(p[2]) << 8) | p[3];
}

void store_be32(uint8_t* p, uint32_t v) {
  p[0] = uint8_t(v >> 24);
  p[1] = uint8_t(v >> 16);
  p[2] = uint8_t(v >> 8);
  p[3] = uint8_t(v);
}

// Encrypts the state s[0..3] (big-endian column words) in place.
void encrypt_words(const Tables& t, const uint32_t rk[44], uint32_t s[4]) {
  uint32_t s0 = s[0] ^ rk[0], s1 = s[1] ^ rk[1], s2 = s[2] ^ rk[2], s3 = s[3] ^ rk[3];
  for (int r = 1; r < 10; ++r) {
    const uint32_t* k = rk + 4 * r;
    const uint32_t t0 = t.te[0][s0 >> 24] ^ t.te[1][(s1 >> 16) & 0xff] ^
                        t.te[2][(s2 >> 8) & 0xff] ^ t.te[3][s3 & 0xff] ^ k[0];
    const uint32_t t1 = t.te[0][s1 >> 24] ^ t.te[1][(s2 >> 16) & 0xff] ^
                        t.te[2][(s3 >> 8) & 0xff] ^ t.te[3][s0 & 0xff] ^ k[1];
    const uint32_t t2 = t.te[0][s2 >> 24] ^ t.te[1][(s3 >> 16) & 0xff] ^
                        t.te[2][(s0 >> 8) & 0xff] ^ t.te[3][s1 & 0xff] ^ k[2];
    const uint32_t t3 = t.te[0][s3 >> 24] ^ t.te[1][(s0 >> 16) & 0xff] ^
                        t.te[2][(s1 >> 8) & 0xff] ^ t.te[3][s2 & 0xff] ^ k[3];
    s0 = t0;
    s1 = t1;
    s2 = t2;
    s3 = t3;
  }
  const uint8_t* S = t.sbox;
  const uint32_t* k = rk + 40;
  s[0] = ((uint32_t(S[s0 >> 24]) << 24) | (uint32_t(S[(s1 >> 16) & 0xff]) << 16) |
          (uint32_t(S[(s2 >> 8) & 0xff]) << 8) | S[s3 & 0xff]) ^ k[0];
  s[1] = ((uint32_t(S[s1 >> 24]) << 24) | (uint32_t(S[(s2 >> 16) & 0xff]) << 16) |
          (uint32_t(S[(s3 >> 8) & 0xff]) << 8) | S[s0 & 0xff]) ^ k[1];
  s[2] = ((uint32_t(S[s2 >> 24]) << 24) | (uint32_t(S[(s3 >> 16) & 0xff]) << 16) |
          (uint32_t(S[(s0 >> 8) & 0xff]) << 8) | S[s1 & 0xff]) ^ k[2];
  s[3] = ((uint32_t(S[s3 >> 24]) << 24) | (uint32_t(S[(s0 >> 16) & 0xff]) << 16) |
          (uint32_t(S[(s1 >> 8) & 0xff]) << 8) | S[s2 & 0xff]) ^ k[3];
}

void words_from_keys(const RoundKeys& keys, uint32_t rk[44]) {
  for (int i = 0; i < 44; ++i) rk[i] = load_be32(keys.bytes + 4 * i);
}

uint32_t bswap32(uint32_t v) { return __builtin_bswap32(v); }

}  // namespace

RoundKeys expand_key(const uint8_t key[16]) {
  const Tables& t = tables();
  uint32_t w[44];
  for (int i = 0; i < 4; ++i) w[i] = load_be32(key + 4 * i);
  uint8_t rcon = 1;
  for (int i = 4; i < 44; ++i) {
    uint32_t temp = w[i - 1];
    if (i % 4 == 0) {
      temp = (temp << 8) | (temp >> 24);  // RotWord
      temp = (uint32_t(t.sbox[temp >> 24]) << 24) | (uint32_t(t.sbox[(temp >> 16) & 0xff]) << 16) |
             (uint32_t(t.sbox[(temp >> 8) & 0xff]) << 8) | t.sbox[temp & 0xff];
      temp ^= uint32_t(rcon) << 24;
      rcon = gf_mul(rcon, 2);
    }
    w[i] = w[i - 4] ^ temp;
  }
  RoundKeys keys;
  for (int i = 0; i < 44; ++i) store_be32(keys.bytes + 4 * i, w[i]);
  return keys;
}

void encrypt_block_portable(const RoundKeys& keys, const uint8_t in[16], uint8_t out[16]) {
  uint32_t rk[44];
  words_from_keys(keys, rk);
  uint32_t s[4];
  for (int i = 0; i < 4; ++i) s[i] = load_be32(in + 4 * i);
  encrypt_words(tables(), rk, s);
  for (int i = 0; i < 4; ++i) store_be32(out + 4 * i, s[i]);
}

void ctr_portable(const RoundKeys& keys, Op op, uint64_t iv_hi, uint64_t block0, size_t nblocks,
                  uint32_t* dst) {
  const Tables& t = tables();
  uint32_t rk[44];
  words_from_keys(keys, rk);
  for (size_t i = 0; i < nblocks; ++i) {
    const uint64_t ctr = block0 + i;
    uint32_t s[4] = {uint32_t(iv_hi >> 32), uint32_t(iv_hi), uint32_t(ctr >> 32), uint32_t(ctr)};
    encrypt_words(t, rk, s);
    uint32_t* d = dst + 4 * i;
    for (int j = 0; j < 4; ++j) {
      const uint32_t w = bswap32(s[j]);  // big-endian column word -> little-endian read
      if (op == Op::store) {
        d[j] = w;
      } else if (op == Op::add) {
        d[j] += w;
      } else {
        d[j] -= w;
      }
    }
  }
}

}  // namespace fedge
