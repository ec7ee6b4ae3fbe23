// Fused optimiser kernels over one flat float32 parameter buffer. Each
// element is computed in double and rounded once to float32 on store.
#pragma once

#include <cstddef>
#include <cstdint>

#include "aes.h"
#include "train_item.h"

namespace fedge {

// torch.optim.SGD on the corrected gradient
//   g' = g + prox_mu * (w - w_global) + (c - c_i)
// momentum_buf may be null when momentum == 0; global_params, scaffold_c and
// scaffold_ci may be null (term absent).
void sgd_step(float* params, const float* grads, float* momentum_buf, size_t n, const SgdArgs& a,
              const float* global_params, const float* scaffold_c, const float* scaffold_ci);

// torch.optim.Adam (decoupled=false) / torch.optim.AdamW (decoupled=true).
void adam_step(float* params, const float* grads, float* exp_avg, float* exp_avg_sq, size_t n,
               const AdamArgs& a);

// L2 norm in double.
double l2_norm(const float* v, size_t n);
void scale(float* v, size_t n, double factor);

// v[i] += std * z_i, z_i standard normal from Box-Muller on PRG words (53-bit
// uniforms built from pairs of words).
void add_gaussian_noise(Path path, float* v, size_t n, double std, const RoundKeys& seed);

}  // namespace fedge
