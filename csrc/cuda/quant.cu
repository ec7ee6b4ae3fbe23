// Quantisation on the GPU, bit-identical to quant.cpp: the same IEEE double
// operations in the same order (compiled with --fmad=false: no FMA).
#include "common.cuh"
#include "fedge_cuda.h"

namespace fedge::cuda {
namespace {

__global__ void quantise_kernel(DeviceKey key, const float* x, uint32_t* out, size_t n,
                                double clip, double scale, double top, unsigned* bad) {
  __shared__ AesTables tables;
  init_tables(tables);
  __syncthreads();
  const uint64_t nblocks = (n + 3) / 4;
  unsigned local_bad = 0;
  for (uint64_t b = blockIdx.x * uint64_t(blockDim.x) + threadIdx.x; b < nblocks;
       b += uint64_t(gridDim.x) * blockDim.x) {
    local_bad |= quantise_item(tables, key, b, x, out, n, clip, scale, top);
  }
  if (local_bad) atomicOr(bad, 1u);
}

__global__ void dequantise_kernel(const uint32_t* total, double* out, size_t n, double scale,
                                  double shift) {
  for (uint64_t i = blockIdx.x * uint64_t(blockDim.x) + threadIdx.x; i < n;
       i += uint64_t(gridDim.x) * blockDim.x) {
    out[i] = dequantise_item(total[i], scale, shift);
  }
}

}  // namespace

bool quantise(int device, uintptr_t stream, const float* x, uint32_t* out, size_t n, double clip,
              double scale, uint32_t qmax, const RoundKeys& key) {
  if (n == 0) return true;
  const DeviceGuard guard(device);
  const cudaStream_t st = as_stream(stream);
  unsigned* bad = nullptr;
  FEDGE_CUDA_CHECK(cudaMallocAsync(&bad, sizeof(unsigned), st));
  FEDGE_CUDA_CHECK(cudaMemsetAsync(bad, 0, sizeof(unsigned), st));
  quantise_kernel<<<grid_for((n + 3) / 4), kThreads, 0, st>>>(device_key(key), x, out, n, clip,
                                                               scale, double(qmax), bad);
  FEDGE_CUDA_CHECK(cudaGetLastError());
  unsigned host_bad = 0;
  FEDGE_CUDA_CHECK(cudaMemcpyAsync(&host_bad, bad, sizeof host_bad, cudaMemcpyDeviceToHost, st));
  FEDGE_CUDA_CHECK(cudaFreeAsync(bad, st));
  FEDGE_CUDA_CHECK(cudaStreamSynchronize(st));
  return host_bad == 0;
}

void dequantise(int device, uintptr_t stream, const uint32_t* total, double* out, size_t n,
                double scale, double shift) {
  if (n == 0) return;
  const DeviceGuard guard(device);
  dequantise_kernel<<<grid_for(n), kThreads, 0, as_stream(stream)>>>(total, out, n, scale, shift);
  FEDGE_CUDA_CHECK(cudaGetLastError());
}

}  // namespace fedge::cuda
