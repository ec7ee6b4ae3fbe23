// The kernels' per-item bodies (common.cuh) run on the host, one item after
// another: lets the tests check the CUDA code's AES tables, indexing and
// arithmetic against the CPU path on machines without a GPU. Not fast.
#include <vector>

#include "common.cuh"
#include "fedge_cuda.h"

namespace fedge::cuda {
namespace {

const AesTables& host_tables() {
  static const AesTables t = [] {
    AesTables tt;
    for (int x = 0; x < 256; ++x) table_entry(tt, x);
    return tt;
  }();
  return t;
}

}  // namespace

void emulate_prg(const RoundKeys& key, uint64_t offset_words, uint32_t* out, size_t n) {
  const DeviceKey dk = device_key(key);
  const uint64_t nblocks = n ? (offset_words + n + 3) / 4 - offset_words / 4 : 0;
  for (uint64_t b = 0; b < nblocks; ++b) prg_item(host_tables(), dk, offset_words, b, out, n);
}

void emulate_apply_masks(const RoundKeys* keys, const int* signs, size_t k, uint64_t offset_words,
                         uint32_t* vec, size_t n) {
  std::vector<DeviceKey> dk(k);
  for (size_t i = 0; i < k; ++i) dk[i] = device_key(keys[i]);
  const uint64_t nblocks = n ? (offset_words + n + 3) / 4 - offset_words / 4 : 0;
  for (uint64_t b = 0; b < nblocks; ++b) {
    mask_item(host_tables(), dk.data(), signs, static_cast<int>(k), offset_words, b, vec, n);
  }
}

bool emulate_quantise(const float* x, uint32_t* out, size_t n, double clip, double scale,
                      uint32_t qmax, const RoundKeys& key) {
  const DeviceKey dk = device_key(key);
  unsigned bad = 0;
  for (uint64_t b = 0; b < (n + 3) / 4; ++b) {
    bad |= quantise_item(host_tables(), dk, b, x, out, n, clip, scale, double(qmax));
  }
  return bad == 0;
}

void emulate_gaussian_noise(float* vec, size_t n, double std, const RoundKeys& key) {
  const DeviceKey dk = device_key(key);
  for (uint64_t p = 0; p < (n + 1) / 2; ++p) {
    uint32_t w[4];
    aes_ctr_block(host_tables(), dk.w, p, w);
    noise_pair(w, std, vec, 2 * p, n);
  }
}

}  // namespace fedge::cuda
