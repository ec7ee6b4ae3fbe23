// The fused SGD and Adam steps on the GPU (train_item.h's per-element code,
// the same source as the CPU loops, compiled with --fmad=false), L2 clipping
// and Gaussian noise.
#include <cmath>

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

__global__ void sum_squares_kernel(const float* v, size_t n, double* total) {
  __shared__ double partial[kThreads];
  double acc = 0.0;
  for (uint64_t i = blockIdx.x * uint64_t(blockDim.x) + threadIdx.x; i < n;
       i += uint64_t(gridDim.x) * blockDim.x) {
    acc += static_cast<double>(v[i]) * v[i];
  }
  partial[threadIdx.x] = acc;
  __syncthreads();
  for (unsigned s = blockDim.x / 2; s > 0; s >>= 1) {
    if (threadIdx.x < s) partial[threadIdx.x] += partial[threadIdx.x + s];
    __syncthreads();
  }
  if (threadIdx.x == 0) atomicAdd(total, partial[0]);
}

__global__ void scale_kernel(float* v, size_t n, double factor) {
  for (uint64_t i = blockIdx.x * uint64_t(blockDim.x) + threadIdx.x; i < n;
       i += uint64_t(gridDim.x) * blockDim.x) {
    v[i] = static_cast<float>(v[i] * factor);
  }
}

__global__ void noise_kernel(DeviceKey key, float* v, size_t n, double std) {
  __shared__ AesTables tables;
  init_tables(tables);
  __syncthreads();
  for (uint64_t p = blockIdx.x * uint64_t(blockDim.x) + threadIdx.x; p < (n + 1) / 2;
       p += uint64_t(gridDim.x) * blockDim.x) {
    uint32_t w[4];
    aes_ctr_block(tables, key.w, p, w);
    noise_pair(w, std, v, 2 * p, n);
  }
}

}  // namespace

double clip_l2(int device, uintptr_t stream, float* vec, size_t n, double max_norm) {
  if (n == 0) return 0.0;
  const DeviceGuard guard(device);
  const cudaStream_t st = as_stream(stream);
  double* total = nullptr;
  FEDGE_CUDA_CHECK(cudaMallocAsync(&total, sizeof(double), st));
  FEDGE_CUDA_CHECK(cudaMemsetAsync(total, 0, sizeof(double), st));
  sum_squares_kernel<<<grid_for(n), kThreads, 0, st>>>(vec, n, total);
  FEDGE_CUDA_CHECK(cudaGetLastError());
  double host_total = 0.0;
  FEDGE_CUDA_CHECK(cudaMemcpyAsync(&host_total, total, sizeof(double), cudaMemcpyDeviceToHost, st));
  FEDGE_CUDA_CHECK(cudaFreeAsync(total, st));
  FEDGE_CUDA_CHECK(cudaStreamSynchronize(st));
  const double norm = std::sqrt(host_total);
  if (std::isfinite(norm) && norm > max_norm) {
    scale_kernel<<<grid_for(n), kThreads, 0, st>>>(vec, n, max_norm / norm);
    FEDGE_CUDA_CHECK(cudaGetLastError());
  }
  return norm;
}

void add_gaussian_noise(int device, uintptr_t stream, float* vec, size_t n, double std,
                        const RoundKeys& key) {
  if (n == 0) return;
  const DeviceGuard guard(device);
  noise_kernel<<<grid_for((n + 1) / 2), kThreads, 0, as_stream(stream)>>>(device_key(key), vec,
                                                                          n, std);
  FEDGE_CUDA_CHECK(cudaGetLastError());
}

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
