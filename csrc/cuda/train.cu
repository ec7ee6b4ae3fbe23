// The fused SGD step on the GPU: the same per-element double arithmetic as
// train.cpp (compiled with --fmad=false), one thread per parameter.
#include <cmath>

#include "common.cuh"
#include "fedge_cuda.h"

namespace fedge::cuda {
namespace {

__global__ void sgd_kernel(float* params, const float* grads, float* momentum_buf, size_t n,
                           SgdDeviceArgs a, const float* global_params, const float* scaffold_c,
                           const float* scaffold_ci) {
  for (uint64_t i = blockIdx.x * uint64_t(blockDim.x) + threadIdx.x; i < n;
       i += uint64_t(gridDim.x) * blockDim.x) {
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
      const float buf32 = static_cast<float>(buf);
      momentum_buf[i] = buf32;
      buf = buf32;
      g = a.nesterov ? g + a.momentum * buf : buf;
    }
    params[i] = static_cast<float>(w - a.lr * g);
  }
}

__global__ void adam_kernel(float* params, const float* grads, float* exp_avg, float* exp_avg_sq,
                            size_t n, AdamDeviceArgs a, double step_size, double bc2_sqrt,
                            double decay) {
  for (uint64_t i = blockIdx.x * uint64_t(blockDim.x) + threadIdx.x; i < n;
       i += uint64_t(gridDim.x) * blockDim.x) {
    double w = params[i];
    double g = grads[i];
    if (a.weight_decay != 0.0 && !a.decoupled) g += a.weight_decay * w;
    w *= decay;
    const float m = static_cast<float>(exp_avg[i] + (g - exp_avg[i]) * (1.0 - a.beta1));
    const float v = static_cast<float>(a.beta2 * exp_avg_sq[i] + (1.0 - a.beta2) * g * g);
    exp_avg[i] = m;
    exp_avg_sq[i] = v;
    const double denom = sqrt(static_cast<double>(v)) / bc2_sqrt + a.eps;
    params[i] = static_cast<float>(w - step_size * static_cast<double>(m) / denom);
  }
}

}  // namespace

void adam_step(int device, uintptr_t stream, float* params, const float* grads, float* exp_avg,
               float* exp_avg_sq, size_t n, const AdamDeviceArgs& a) {
  if (n == 0) return;
  const DeviceGuard guard(device);
  // Host-side scalars exactly as train.cpp computes them.
  const double bc1 = 1.0 - std::pow(a.beta1, static_cast<double>(a.step));
  const double bc2 = 1.0 - std::pow(a.beta2, static_cast<double>(a.step));
  const double decay = a.decoupled ? 1.0 - a.lr * a.weight_decay : 1.0;
  adam_kernel<<<grid_for(n), kThreads, 0, as_stream(stream)>>>(
      params, grads, exp_avg, exp_avg_sq, n, a, a.lr / bc1, std::sqrt(bc2), decay);
  FEDGE_CUDA_CHECK(cudaGetLastError());
}

void sgd_step(int device, uintptr_t stream, float* params, const float* grads, float* momentum_buf,
              size_t n, const SgdDeviceArgs& a, const float* global_params,
              const float* scaffold_c, const float* scaffold_ci) {
  if (n == 0) return;
  const DeviceGuard guard(device);
  sgd_kernel<<<grid_for(n), kThreads, 0, as_stream(stream)>>>(params, grads, momentum_buf, n, a,
                                                               global_params, scaffold_c,
                                                               scaffold_ci);
  FEDGE_CUDA_CHECK(cudaGetLastError());
}

}  // namespace fedge::cuda
