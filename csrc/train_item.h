// One element of the fused optimiser steps. Shared, as source, by the CPU
// loops (train.cpp) and the CUDA kernels (cuda/train.cu), so both compute the
// same double-precision operations in the same order (no FMA contraction on
// either side: -ffp-contract=off and --fmad=false).
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>

#ifdef __CUDACC__
#define FEDGE_ITEM __host__ __device__ inline
#else
#define FEDGE_ITEM inline
#endif

namespace fedge {

struct SgdArgs {
  double lr = 0.0, momentum = 0.0, weight_decay = 0.0, dampening = 0.0, prox_mu = 0.0;
  bool nesterov = false;
  bool first_step = false;  // torch semantics: the momentum buffer starts as the gradient
};

struct AdamArgs {
  double lr = 0.0, beta1 = 0.9, beta2 = 0.999, eps = 1e-8, weight_decay = 0.0;
  int64_t step = 1;
  bool decoupled = false;  // AdamW
};

// Per-step scalars of Adam, computed once on the host.
struct AdamScalars {
  double step_size, bc2_sqrt, decay;
};

inline AdamScalars adam_scalars(const AdamArgs& a) {
  const double bc1 = 1.0 - std::pow(a.beta1, static_cast<double>(a.step));
  const double bc2 = 1.0 - std::pow(a.beta2, static_cast<double>(a.step));
  return {a.lr / bc1, std::sqrt(bc2), a.decoupled ? 1.0 - a.lr * a.weight_decay : 1.0};
}

// torch.optim.SGD on g' = g + prox_mu (w - w_global) + (c - c_i); a null
// pointer drops its term.
FEDGE_ITEM void sgd_item(size_t i, float* params, const float* grads, float* momentum_buf,
                         const SgdArgs& a, const float* global_params, const float* scaffold_c,
                         const float* scaffold_ci) {
  const double w = params[i];
  double g = grads[i];
  if (global_params != nullptr) g += a.prox_mu * (w - static_cast<double>(global_params[i]));
  if (scaffold_c != nullptr) g += static_cast<double>(scaffold_c[i]);
  if (scaffold_ci != nullptr) g -= static_cast<double>(scaffold_ci[i]);
  if (a.weight_decay != 0.0) g += a.weight_decay * w;
  if (a.momentum != 0.0) {
    double buf = a.first_step ? g
                              : a.momentum * static_cast<double>(momentum_buf[i]) +
                                    (1.0 - a.dampening) * g;
    const float buf32 = static_cast<float>(buf);  // torch keeps the buffer in float32
    momentum_buf[i] = buf32;
    buf = buf32;
    g = a.nesterov ? g + a.momentum * buf : buf;
  }
  params[i] = static_cast<float>(w - a.lr * g);
}

// torch.optim.Adam / AdamW (amsgrad off); moments stored in float32 as torch does.
FEDGE_ITEM void adam_item(size_t i, float* params, const float* grads, float* exp_avg,
                          float* exp_avg_sq, const AdamArgs& a, const AdamScalars& k) {
  double w = params[i];
  double g = grads[i];
  if (a.weight_decay != 0.0 && !a.decoupled) g += a.weight_decay * w;
  w *= k.decay;
  const float m = static_cast<float>(exp_avg[i] + (g - exp_avg[i]) * (1.0 - a.beta1));
  const float v = static_cast<float>(a.beta2 * exp_avg_sq[i] + (1.0 - a.beta2) * g * g);
  exp_avg[i] = m;
  exp_avg_sq[i] = v;
  const double denom = sqrt(static_cast<double>(v)) / k.bc2_sqrt + a.eps;
  params[i] = static_cast<float>(w - k.step_size * static_cast<double>(m) / denom);
}

// Two normals by Box-Muller from one PRG block w[0..3] (53-bit uniforms from
// pairs of words), added times `std` to v[i] and v[i + 1] (when i + 1 < n).
// On the GPU log/sqrt/sin/cos are CUDA's, within an ulp or two of libm's: the
// noise there has the same distribution, not the same bits.
FEDGE_ITEM void noise_pair(const uint32_t w[4], double std, float* v, size_t i, size_t n) {
  const double two_pi = 6.283185307179586476925286766559;
  const uint64_t a = (uint64_t(w[0]) << 21) | (w[1] >> 11);  // 53 bits
  const uint64_t b = (uint64_t(w[2]) << 21) | (w[3] >> 11);
  const double u1 = (static_cast<double>(a) + 1.0) * 0x1p-53;  // (0, 1]
  const double u2 = static_cast<double>(b) * 0x1p-53;          // [0, 1)
  const double r = sqrt(-2.0 * log(u1)) * std;
  v[i] = static_cast<float>(v[i] + r * cos(two_pi * u2));
  if (i + 1 < n) v[i + 1] = static_cast<float>(v[i + 1] + r * sin(two_pi * u2));
}

}  // namespace fedge
