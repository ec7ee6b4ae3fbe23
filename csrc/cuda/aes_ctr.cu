// PRG and masks on the GPU. One thread per 16-byte keystream block; the
// block's words land at vector indices 4j - offset_words + {0..3}, so an
// offset that is not a multiple of 4 needs no special head or tail.
#include <vector>

#include "common.cuh"
#include "fedge_cuda.h"

namespace fedge::cuda {
namespace {

// Keys per launch: their schedules sit in shared memory (176 B each).
constexpr size_t kKeysPerLaunch = 64;

__global__ void prg_kernel(DeviceKey key, uint64_t offset_words, uint32_t* out, size_t n) {
  __shared__ AesTables tables;
  init_tables(tables);
  __syncthreads();
  const uint64_t nblocks = (offset_words + n + 3) / 4 - offset_words / 4;
  for (uint64_t b = blockIdx.x * uint64_t(blockDim.x) + threadIdx.x; b < nblocks;
       b += uint64_t(gridDim.x) * blockDim.x) {
    prg_item(tables, key, offset_words, b, out, n);
  }
}

__global__ void mask_kernel(const DeviceKey* keys, const int* signs, int k, uint64_t offset_words,
                            uint32_t* vec, size_t n) {
  __shared__ AesTables tables;
  __shared__ DeviceKey sk[kKeysPerLaunch];
  __shared__ int ss[kKeysPerLaunch];
  init_tables(tables);
  for (int i = threadIdx.x; i < k * 44; i += blockDim.x) sk[i / 44].w[i % 44] = keys[i / 44].w[i % 44];
  for (int i = threadIdx.x; i < k; i += blockDim.x) ss[i] = signs[i];
  __syncthreads();
  const uint64_t nblocks = (offset_words + n + 3) / 4 - offset_words / 4;
  for (uint64_t b = blockIdx.x * uint64_t(blockDim.x) + threadIdx.x; b < nblocks;
       b += uint64_t(gridDim.x) * blockDim.x) {
    mask_item(tables, sk, ss, k, offset_words, b, vec, n);
  }
}

}  // namespace

int device_count() noexcept {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    (void)cudaGetLastError();  // clear the sticky-free error (no driver / no device)
    return 0;
  }
  return n;
}

void prg(int device, uintptr_t stream, const RoundKeys& key, uint64_t offset_words, uint32_t* out,
         size_t n) {
  if (n == 0) return;
  const DeviceGuard guard(device);
  const size_t nblocks = (offset_words + n + 3) / 4 - offset_words / 4;
  prg_kernel<<<grid_for(nblocks), kThreads, 0, as_stream(stream)>>>(device_key(key), offset_words,
                                                                     out, n);
  FEDGE_CUDA_CHECK(cudaGetLastError());
}

void apply_masks(int device, uintptr_t stream, const RoundKeys* keys, const int* signs, size_t k,
                 uint64_t offset_words, uint32_t* vec, size_t n) {
  if (n == 0 || k == 0) return;
  const DeviceGuard guard(device);
  const cudaStream_t st = as_stream(stream);
  const size_t nblocks = (offset_words + n + 3) / 4 - offset_words / 4;
  DeviceKey* dkeys = nullptr;
  int* dsigns = nullptr;
  FEDGE_CUDA_CHECK(cudaMallocAsync(&dkeys, k * sizeof(DeviceKey), st));
  FEDGE_CUDA_CHECK(cudaMallocAsync(&dsigns, k * sizeof(int), st));
  std::vector<DeviceKey> host_keys(k);
  for (size_t i = 0; i < k; ++i) host_keys[i] = device_key(keys[i]);
  // Pageable host memory: cudaMemcpyAsync has staged the data when it returns.
  FEDGE_CUDA_CHECK(cudaMemcpyAsync(dkeys, host_keys.data(), k * sizeof(DeviceKey),
                                   cudaMemcpyHostToDevice, st));
  FEDGE_CUDA_CHECK(cudaMemcpyAsync(dsigns, signs, k * sizeof(int), cudaMemcpyHostToDevice, st));
  for (size_t s = 0; s < k; s += kKeysPerLaunch) {
    const int cnt = static_cast<int>(k - s < kKeysPerLaunch ? k - s : kKeysPerLaunch);
    mask_kernel<<<grid_for(nblocks), kThreads, 0, st>>>(dkeys + s, dsigns + s, cnt, offset_words,
                                                         vec, n);
    FEDGE_CUDA_CHECK(cudaGetLastError());
  }
  FEDGE_CUDA_CHECK(cudaFreeAsync(dkeys, st));
  FEDGE_CUDA_CHECK(cudaFreeAsync(dsigns, st));
}

}  // namespace fedge::cuda
