#include "train.h"

#include <algorithm>
#include <cmath>

#include "prg.h"

namespace fedge {

void sgd_step(float* params, const float* grads, float* momentum_buf, size_t n, const SgdArgs& a,
              const float* global_params, const float* scaffold_c, const float* scaffold_ci) {
  for (size_t i = 0; i < n; ++i) {
    sgd_item(i, params, grads, momentum_buf, a, global_params, scaffold_c, scaffold_ci);
  }
}

void adam_step(float* params, const float* grads, float* exp_avg, float* exp_avg_sq, size_t n,
               const AdamArgs& a) {
  const AdamScalars k = adam_scalars(a);
  for (size_t i = 0; i < n; ++i) adam_item(i, params, grads, exp_avg, exp_avg_sq, a, k);
}

double l2_norm(const float* v, size_t n) {
  // Four partial sums: lets the compiler vectorise without reassociation flags.
  double s[4] = {0, 0, 0, 0};
  size_t i = 0;
  for (; i + 4 <= n; i += 4) {
    for (int j = 0; j < 4; ++j) s[j] += static_cast<double>(v[i + j]) * v[i + j];
  }
  for (; i < n; ++i) s[0] += static_cast<double>(v[i]) * v[i];
  return std::sqrt((s[0] + s[1]) + (s[2] + s[3]));
}

void scale(float* v, size_t n, double factor) {
  for (size_t i = 0; i < n; ++i) v[i] = static_cast<float>(v[i] * factor);
}

void add_gaussian_noise(Path path, float* v, size_t n, double std, const RoundKeys& seed) {
  constexpr size_t kPairs = 512;  // one PRG block (4 words) per pair of normals
  uint32_t w[4 * kPairs];
  for (size_t base = 0; base < n; base += 2 * kPairs) {
    const size_t pairs = (std::min(2 * kPairs, n - base) + 1) / 2;
    keystream(path, seed, 2 * static_cast<uint64_t>(base), w, 4 * pairs);
    for (size_t p = 0; p < pairs; ++p) noise_pair(w + 4 * p, std, v, base + 2 * p, n);
  }
}

}  // namespace fedge
