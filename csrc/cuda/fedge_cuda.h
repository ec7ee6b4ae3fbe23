// Host-side interface to the CUDA kernels (compiled only when nvcc is found).
// Plain C++ so that module.cpp, built by the host compiler, can call it.
// Every function takes the device index and a cudaStream_t (as an integer,
// e.g. torch.cuda.current_stream().cuda_stream) and throws std::runtime_error
// naming the file and line of a failing CUDA call. Device pointers come from
// the caller (torch tensors); no function keeps them.
#pragma once

#include <cstddef>
#include <cstdint>

#include "../aes.h"
#include "../train_item.h"

namespace fedge::cuda {

// CUDA devices visible; 0 when there is no driver or no GPU (never throws).
int device_count() noexcept;

void prg(int device, uintptr_t stream, const RoundKeys& key, uint64_t offset_words, uint32_t* out,
         size_t n);

// signs[j] is +1 or -1.
void apply_masks(int device, uintptr_t stream, const RoundKeys* keys, const int* signs, size_t k,
                 uint64_t offset_words, uint32_t* vec, size_t n);

// Same arithmetic as fedge::quantise; returns false when x holds NaN/Inf.
// Synchronises the stream (to read the NaN flag).
bool quantise(int device, uintptr_t stream, const float* x, uint32_t* out, size_t n, double clip,
              double scale, uint32_t qmax, const RoundKeys& key);

void dequantise(int device, uintptr_t stream, const uint32_t* total, double* out, size_t n,
                double scale, double shift);

void sgd_step(int device, uintptr_t stream, float* params, const float* grads, float* momentum_buf,
              size_t n, const SgdArgs& a, const float* global_params,
              const float* scaffold_c, const float* scaffold_ci);

void adam_step(int device, uintptr_t stream, float* params, const float* grads, float* exp_avg,
               float* exp_avg_sq, size_t n, const AdamArgs& a);

// Returns the L2 norm (double accumulation; the order differs from the CPU's,
// so it agrees to rounding, not bit for bit) and scales vec by max_norm/norm
// when the norm exceeds max_norm. Synchronises the stream.
double clip_l2(int device, uintptr_t stream, float* vec, size_t n, double max_norm);

void add_gaussian_noise(int device, uintptr_t stream, float* vec, size_t n, double std,
                        const RoundKeys& key);

// The kernels' per-item code run on the host (emulate.cu), for tests.
void emulate_prg(const RoundKeys& key, uint64_t offset_words, uint32_t* out, size_t n);
void emulate_apply_masks(const RoundKeys* keys, const int* signs, size_t k, uint64_t offset_words,
                         uint32_t* vec, size_t n);
bool emulate_quantise(const float* x, uint32_t* out, size_t n, double clip, double scale,
                      uint32_t qmax, const RoundKeys& key);
void emulate_gaussian_noise(float* vec, size_t n, double std, const RoundKeys& key);

}  // namespace fedge::cuda
