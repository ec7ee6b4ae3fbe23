// Shared by the .cu files: the CUDA check macro and AES-128 on the device.
//
// The device AES is the same T-table formulation as aes_portable.cpp. Each
// thread block derives the S-box (GF(2^8) inverse + affine map) and the four
// T-tables into shared memory at start-up: no host state, no per-device
// initialisation, nothing to copy. Blocks then stride over the grid.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
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

__device__ inline uint8_t gf_mul(uint8_t a, uint8_t b) {
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

// Fills the tables; call from every thread of the block, then __syncthreads().
__device__ inline void init_tables(AesTables& t) {
  for (int x = threadIdx.x; x < 256; x += blockDim.x) {
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
}

// Keystream block `ctr` (IV zero): out[j] is the little-endian word j.
__device__ inline void aes_ctr_block(const AesTables& t, const uint32_t* rk, uint64_t ctr,
                                     uint32_t out[4]) {
  uint32_t s0 = rk[0], s1 = rk[1];
  uint32_t s2 = uint32_t(ctr >> 32) ^ rk[2], s3 = uint32_t(ctr) ^ rk[3];
#pragma unroll
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
  out[0] = __byte_perm(c0, 0, 0x0123);
  out[1] = __byte_perm(c1, 0, 0x0123);
  out[2] = __byte_perm(c2, 0, 0x0123);
  out[3] = __byte_perm(c3, 0, 0x0123);
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
