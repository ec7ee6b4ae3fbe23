// Shared by the .cu files: the CUDA check macro, AES-128 for the device, and
// the per-item bodies of every kernel.
//
// The device AES is the same T-table formulation as aes_portable.cpp. Each
// thread block derives the S-box (GF(2^8) inverse + affine map) and the four
// T-tables into shared memory at start-up: no host state, no per-device
// initialisation, nothing to copy. Blocks then stride over the grid.
//
// Everything a kernel computes per item is a __host__ __device__ function
// (FEDGE_HD): emulate.cu runs the very same code on the CPU, so the tests
// check the kernels' arithmetic and indexing on machines without a GPU.
#pragma once

#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>

#include "../aes.h"

#define FEDGE_CUDA_CHECK(expr)                                                              \
  do {                                                                                      \
    const cudaError_t fedge_err_ = (expr);                                                  \
    if (fedge_err_ != cudaSuccess) {                                                        \
      throw std::runtime_error(std::string("CUDA error at ") + __FILE__ + ":" +             \
                               std::to_string(__LINE__) + ": " #expr ": " +                 \
                               cudaGetErrorName(fedge_err_) + " (" +                        \
                               cudaGetErrorString(fedge_err_) + ")");                       \
    }                                                                                       \
  } while (0)

#define FEDGE_HD __host__ __device__

namespace fedge::cuda {

constexpr int kThreads = 256;

// Round keys as 44 big-endian words (what the T-table rounds consume).
struct DeviceKey {
  uint32_t w[44];
};

inline DeviceKey device_key(const RoundKeys& k) {
  DeviceKey d;
  for (int i = 0; i < 44; ++i) {
    const uint8_t* p = k.bytes + 4 * i;
    d.w[i] = (uint32_t(p[0]) << 24) | (uint32_t(p[1]) << 16) | (uint32_t(p[2]) << 8) | p[3];
  }
  return d;
}

struct AesTables {
  uint32_t te[4][256];
  uint8_t sbox[256];
};

FEDGE_HD inline uint8_t gf_mul(uint8_t a, uint8_t b) {
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

// Entry x of the S-box and the four T-tables.
FEDGE_HD inline void table_entry(AesTables& t, int x) {
  uint8_t inv = 1, base = static_cast<uint8_t>(x);
  for (int e = 254; e; e >>= 1) {
    if (e & 1) inv = gf_mul(inv, base);
    base = gf_mul(base, base);
  }
  if (x == 0) inv = 0;
  const uint32_t i = inv;
  const uint32_t rot = i ^ ((i << 1) | (i >> 7)) ^ ((i << 2) | (i >> 6)) ^ ((i << 3) | (i >> 5)) ^
                       ((i << 4) | (i >> 4));
  const uint32_t s = (rot ^ 0x63u) & 0xffu;
  t.sbox[x] = static_cast<uint8_t>(s);
  const uint32_t s2 = gf_mul(static_cast<uint8_t>(s), 2), s3 = gf_mul(static_cast<uint8_t>(s), 3);
  t.te[0][x] = (s2 << 24) | (s << 16) | (s << 8) | s3;
  t.te[1][x] = (s3 << 24) | (s2 << 16) | (s << 8) | s;
  t.te[2][x] = (s << 24) | (s3 << 16) | (s2 << 8) | s;
  t.te[3][x] = (s << 24) | (s << 16) | (s3 << 8) | s2;
}

// Fills the tables; call from every thread of the block, then __syncthreads().
__device__ inline void init_tables(AesTables& t) {
  for (int x = threadIdx.x; x < 256; x += blockDim.x) table_entry(t, x);
}

FEDGE_HD inline uint32_t bswap32(uint32_t v) {
  return (v >> 24) | ((v >> 8) & 0xff00u) | ((v << 8) & 0xff0000u) | (v << 24);
}

// Keystream block `ctr` (IV zero): out[j] is the little-endian word j.
FEDGE_HD inline void aes_ctr_block(const AesTables& t, const uint32_t* rk, uint64_t ctr,
                                     uint32_t out[4]) {
  uint32_t s0 = rk[0], s1 = rk[1];
  uint32_t s2 = uint32_t(ctr >> 32) ^ rk[2], s3 = uint32_t(ctr) ^ rk[3];
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
  const uint32_t c0 = ((uint32_t(S[s0 >> 24]) << 24) | (uint32_t(S[(s1 >> 16) & 0xff]) << 16) |
                       (uint32_t(S[(s2 >> 8) & 0xff]) << 8) | S[s3 & 0xff]) ^ k[0];
  const uint32_t c1 = ((uint32_t(S[s1 >> 24]) << 24) | (uint32_t(S[(s2 >> 16) & 0xff]) << 16) |
                       (uint32_t(S[(s3 >> 8) & 0xff]) << 8) | S[s0 & 0xff]) ^ k[1];
  const uint32_t c2 = ((uint32_t(S[s2 >> 24]) << 24) | (uint32_t(S[(s3 >> 16) & 0xff]) << 16) |
                       (uint32_t(S[(s0 >> 8) & 0xff]) << 8) | S[s1 & 0xff]) ^ k[2];
  const uint32_t c3 = ((uint32_t(S[s3 >> 24]) << 24) | (uint32_t(S[(s0 >> 16) & 0xff]) << 16) |
                       (uint32_t(S[(s1 >> 8) & 0xff]) << 8) | S[s2 & 0xff]) ^ k[3];
  out[0] = bswap32(c0);
  out[1] = bswap32(c1);
  out[2] = bswap32(c2);
  out[3] = bswap32(c3);
}

// --- per-item kernel bodies: item b is keystream block b of the launch ---

// PRG: block first + b lands at out[4(first + b) - offset_words + j], j < 4.
FEDGE_HD inline void prg_item(const AesTables& t, const DeviceKey& key, uint64_t offset_words,
                              uint64_t b, uint32_t* out, size_t n) {
  const uint64_t first = offset_words / 4;
  uint32_t w[4];
  aes_ctr_block(t, key.w, first + b, w);
  const int64_t base = int64_t(4 * (first + b)) - int64_t(offset_words);
  for (int j = 0; j < 4; ++j) {
    const int64_t i = base + j;
    if (i >= 0 && i < int64_t(n)) out[i] = w[j];
  }
}

// Masks: all k keystreams summed with their signs, then one add to vec.
FEDGE_HD inline void mask_item(const AesTables& t, const DeviceKey* keys, const int* signs, int k,
                               uint64_t offset_words, uint64_t b, uint32_t* vec, size_t n) {
  const uint64_t first = offset_words / 4;
  uint32_t acc[4] = {0, 0, 0, 0};
  for (int s = 0; s < k; ++s) {
    uint32_t w[4];
    aes_ctr_block(t, keys[s].w, first + b, w);
    for (int j = 0; j < 4; ++j) acc[j] = signs[s] > 0 ? acc[j] + w[j] : acc[j] - w[j];
  }
  const int64_t base = int64_t(4 * (first + b)) - int64_t(offset_words);
  for (int j = 0; j < 4; ++j) {
    const int64_t i = base + j;
    if (i >= 0 && i < int64_t(n)) vec[i] += acc[j];
  }
}

// Quantisation of elements 4b..4b+3 with PRG block b; returns 1 if one of
// them is NaN or infinite. Compiled with --fmad=false: no contraction, so the
// operations are those of quant.cpp, in its order.
FEDGE_HD inline unsigned quantise_item(const AesTables& t, const DeviceKey& key, uint64_t b,
                                       const float* x, uint32_t* out, size_t n, double clip,
                                       double scale, double top) {
  uint32_t u[4];
  aes_ctr_block(t, key.w, b, u);
  unsigned bad = 0;
  for (int j = 0; j < 4; ++j) {
    const uint64_t i = 4 * b + j;
    if (i >= n) break;
    uint32_t bits;
    memcpy(&bits, x + i, sizeof bits);
    bad |= static_cast<unsigned>((bits & 0x7f800000u) == 0x7f800000u);
    double v = static_cast<double>(x[i]);
    v = v < -clip ? -clip : v;
    v = v > clip ? clip : v;
    const double y = (v + clip) * scale + static_cast<double>(u[j]) * 0x1p-32;
    double f = floor(y);
    f = f < top ? f : top;
    out[i] = static_cast<uint32_t>(static_cast<long long>(f));
  }
  return bad;
}

FEDGE_HD inline double dequantise_item(uint32_t total, double scale, double shift) {
  return static_cast<double>(total) / scale - shift;
}

// Makes `device` current for the call and restores the caller's device after:
// torch (with its own CUDA runtime) shares the thread's current context.
class DeviceGuard {
 public:
  explicit DeviceGuard(int device) {
    FEDGE_CUDA_CHECK(cudaGetDevice(&previous_));
    if (previous_ != device) FEDGE_CUDA_CHECK(cudaSetDevice(device));
  }
  ~DeviceGuard() { (void)cudaSetDevice(previous_); }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int previous_ = 0;
};

inline cudaStream_t as_stream(uintptr_t s) { return reinterpret_cast<cudaStream_t>(s); }

// Grid for `items` work items with kThreads per block, capped so that the
// per-block table set-up stays small next to the work.
inline unsigned grid_for(size_t items) {
  const size_t blocks = (items + kThreads - 1) / kThreads;
  return static_cast<unsigned>(blocks < 4096 ? (blocks ? blocks : 1) : 4096);
}

}  // namespace fedge::cuda
