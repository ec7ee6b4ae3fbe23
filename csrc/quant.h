// Quantisation for secure aggregation: clip to [-c, c], unbiased stochastic
// rounding to b-bit fixed point with randomness from the AES-CTR PRG, and the
// dequantisation of a sum of n such vectors.
//
//   s = (2^b - 1) / (2c);  q = min(floor((clip(x) + c) * s + u), 2^b - 1)
//   u = w * 2^-32, w the PRG word at the element's index
//   dequantise(S, n) = S / s - n * c
//
// All arithmetic is IEEE double with no fused multiply-add (-ffp-contract=off,
// and --fmad=false for cuda/quant.cu), so CPU and CUDA agree bit for bit.
#pragma once

#include <cstddef>
#include <cstdint>

#include "aes.h"

namespace fedge {

// Largest b <= 31 with n * (2^b - 1) <= 2^32 - 1, or 0 when even b = 1 wraps.
int quant_bits(uint64_t n_summands);

// s = (2^b - 1) / (2c)
double quant_scale(int bits, double clip);

// Returns false (out partly written) when x holds NaN or +-Inf.
bool quantise(Path path, const float* x, size_t n, double clip, int bits, const RoundKeys& seed,
              uint32_t* out, int threads);

void dequantise(const uint32_t* total, size_t n, uint64_t n_summands, double clip, int bits,
                double* out);

// The same per-element arithmetic, for a chunk whose PRG words u[] are given.
// Returns false when x holds NaN or +-Inf.
bool quantise_words(const float* x, const uint32_t* u, size_t n, double clip, double scale,
                    uint32_t qmax, uint32_t* out);
// The same on 4 lanes (AVX2) and 8 lanes (AVX-512F): identical bits. Callers
// check that the CPU has the instructions.
bool quantise_words_avx2(const float* x, const uint32_t* u, size_t n, double clip, double scale,
                         uint32_t qmax, uint32_t* out);
bool quantise_words_avx512(const float* x, const uint32_t* u, size_t n, double clip, double scale,
                           uint32_t qmax, uint32_t* out);

}  // namespace fedge
