#include "prg.h"

#include <algorithm>
#include <cstdlib>
#include <stdexcept>

#include "parallel.h"

namespace fedge {
namespace {

// 512 blocks = 8 KiB of the vector: stays in L1 while all k keystreams pass.
constexpr size_t kChunkBlocks = 512;
// Below this many blocks per thread a thread costs more than it saves.
constexpr size_t kMinBlocksPerThread = 8192;

bool cpu_has_aesni() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("aes") && __builtin_cpu_supports("ssse3");
}

bool cpu_has_vaes256() {
  __builtin_cpu_init();
  return cpu_has_aesni() && __builtin_cpu_supports("vaes") && __builtin_cpu_supports("avx2");
}

bool cpu_has_vaes() {
  __builtin_cpu_init();
  return cpu_has_vaes256() && __builtin_cpu_supports("avx512f") &&
         __builtin_cpu_supports("avx512bw");
}

}  // namespace

CtrKernel kernel_for(Path p) {
  switch (p) {
    case Path::vaes:
      return ctr_vaes;
    case Path::vaes256:
      return ctr_vaes256;
    case Path::aesni:
      return ctr_aesni;
    case Path::portable:
      break;
  }
  return ctr_portable;
}

namespace {

void apply_op(uint32_t& d, uint32_t w, Op op) {
  if (op == Op::store) {
    d = w;
  } else if (op == Op::add) {
    d += w;
  } else {
    d -= w;
  }
}

// A partial block: keystream block `block`, words [from, to) applied to dst[0..to-from).
void apply_partial(CtrKernel kern, const RoundKeys* keys, const Op* ops, size_t k, uint64_t block,
                   unsigned from, unsigned to, uint32_t* dst) {
  for (size_t s = 0; s < k; ++s) {
    uint32_t tmp[4];
    kern(keys[s], Op::store, 0, block, 1, tmp);
    for (unsigned j = from; j < to; ++j) apply_op(dst[j - from], tmp[j], ops[s]);
  }
}

void apply_blocks(CtrKernel kern, const RoundKeys* keys, const Op* ops, size_t k, uint64_t block0,
                  size_t nblocks, uint32_t* dst) {
  for (size_t c = 0; c < nblocks; c += kChunkBlocks) {
    const size_t cnt = std::min(kChunkBlocks, nblocks - c);
    for (size_t s = 0; s < k; ++s) kern(keys[s], ops[s], 0, block0 + c, cnt, dst + 4 * c);
  }
}

}  // namespace

bool path_available(Path p) {
  switch (p) {
    case Path::portable:
      return true;
    case Path::aesni:
      return cpu_has_aesni();
    case Path::vaes256:
      return cpu_has_vaes256();
    case Path::vaes:
      return cpu_has_vaes();
  }
  return false;
}

std::vector<Path> available_paths() {
  std::vector<Path> out;
  for (Path p : {Path::vaes, Path::vaes256, Path::aesni, Path::portable}) {
    if (path_available(p)) out.push_back(p);
  }
  return out;
}

Path best_path() { return available_paths().front(); }

const char* path_name(Path p) {
  switch (p) {
    case Path::vaes:
      return "vaes";
    case Path::vaes256:
      return "vaes256";
    case Path::aesni:
      return "aesni";
    case Path::portable:
      break;
  }
  return "portable";
}

Path parse_path(const std::string& name, const char* what) {
  Path p;
  if (name == "portable") {
    p = Path::portable;
  } else if (name == "aesni") {
    p = Path::aesni;
  } else if (name == "vaes256") {
    p = Path::vaes256;
  } else if (name == "vaes") {
    p = Path::vaes;
  } else {
    throw std::invalid_argument(std::string(what) + "='" + name +
                                "' is not a PRG path; expected 'portable', 'aesni', 'vaes256' "
                                "or 'vaes'");
  }
  if (!path_available(p)) {
    std::string have;
    for (Path q : available_paths()) have += std::string(have.empty() ? "" : ", ") + path_name(q);
    throw std::invalid_argument(std::string(what) + "='" + name +
                                "' is not supported by this CPU (available: " + have + ")");
  }
  return p;
}

Path default_path() {
  const char* env = std::getenv("FEDGE_SIMD");
  if (env == nullptr || *env == '\0') return best_path();
  return parse_path(env, "FEDGE_SIMD");
}

void apply_keystreams(Path path, const RoundKeys* keys, const Op* ops, size_t k,
                      uint64_t offset_words, uint32_t* dst, size_t n, int threads) {
  if (n == 0 || k == 0) return;
  const CtrKernel kern = kernel_for(path);
  uint64_t pos = offset_words;  // keystream word at dst[0]
  size_t done = 0;
  // Head: up to the first block boundary.
  if (pos % 4 != 0) {
    const unsigned from = unsigned(pos % 4);
    const unsigned to = unsigned(std::min<uint64_t>(4, from + n));
    apply_partial(kern, keys, ops, k, pos / 4, from, to, dst);
    done += to - from;
    pos += to - from;
  }
  // Body: whole blocks, split among threads.
  const size_t nblocks = (n - done) / 4;
  if (nblocks > 0) {
    const uint64_t block0 = pos / 4;
    uint32_t* body = dst + done;
    size_t t = static_cast<size_t>(std::max(threads, 1));
    t = std::max<size_t>(1, std::min(t, nblocks / kMinBlocksPerThread));
    const size_t per = (nblocks + t - 1) / t;
    run_parts((nblocks + per - 1) / per, [&](size_t i) {
      const size_t b = i * per;
      apply_blocks(kern, keys, ops, k, block0 + b, std::min(per, nblocks - b), body + 4 * b);
    });
    done += 4 * nblocks;
    pos += 4 * nblocks;
  }
  // Tail: the last partial block.
  if (done < n) {
    apply_partial(kern, keys, ops, k, pos / 4, 0, unsigned(n - done), dst + done);
  }
}

void keystream(Path path, const RoundKeys& keys, uint64_t offset_words, uint32_t* dst, size_t n) {
  const Op op = Op::store;
  apply_keystreams(path, &keys, &op, 1, offset_words, dst, n, 1);
}

}  // namespace fedge
