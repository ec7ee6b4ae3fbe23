// The fused SGD and Adam steps on the GPU: train_item.h's per-element code,
// the same source as the CPU loops (compiled with --fmad=false).
#include "common.cuh"
#include "fedge_cuda.h"

namespace fedge::cuda {
namespace {

__global__ void sgd_kernel(float* params, const float* grads, float* momentum_buf, size_t n,
                           SgdArgs a, const float* global_params, const float* scaffold_c,
                           const float* scaffold_ci) {
  for (uint64_t i = blockIdx.x * uint64_t(blockDim.x) + threadIdx.x; i < n;
       i += uint64_t(gridDim.x) * blockDim.x) {
    sgd_item(i, params, grads, momentum_buf, a, global_params, scaffold_c, scaffold_ci);
  }
}

__global__ void adam_kernel(float* params, const float* grads, float* exp_avg, float* exp_avg_sq,
                            size_t n, AdamArgs a, AdamScalars k) {
  for (uint64_t i = blockIdx.x * uint64_t(blockDim.x) + threadIdx.x; i < n;
       i += uint64_t(gridDim.x) * blockDim.x) {
    adam_item(i, params, grads, exp_avg, exp_avg_sq, a, k);
  }
}

}  // namespace

void adam_step(int device, uintptr_t stream, float* params, const float* grads, float* exp_avg,
               float* exp_avg_sq, size_t n, const AdamArgs& a) {
  if (n == 0) return;
  const DeviceGuard guard(device);
  adam_kernel<<<grid_for(n), kThreads, 0, as_stream(stream)>>>(params, grads, exp_avg, exp_avg_sq,
                                                                n, a, adam_scalars(a));
  FEDGE_CUDA_CHECK(cudaGetLastError());
}

void sgd_step(int device, uintptr_t stream, float* params, const float* grads, float* momentum_buf,
              size_t n, const SgdArgs& a, const float* global_params, const float* scaffold_c,
              const float* scaffold_ci) {
  if (n == 0) return;
  const DeviceGuard guard(device);
  sgd_kernel<<<grid_for(n), kThreads, 0, as_stream(stream)>>>(params, grads, momentum_buf, n, a,
                                                               global_params, scaffold_c,
                                                               scaffold_ci);
  FEDGE_CUDA_CHECK(cudaGetLastError());
}

}  // namespace fedge::cuda
