// The PRG and the mask pass built on the AES-CTR kernels: run-time choice of
// the kernel, word offsets that need not fall on a block boundary, cache
// blocking over many seeds, and threads over chunks of the vector.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "aes.h"

namespace fedge {

bool path_available(Path p);
std::vector<Path> available_paths();
Path best_path();
const char* path_name(Path p);
// Parses "portable" | "aesni" | "vaes256" | "vaes"; throws std::invalid_argument naming
// `what` and the value when the name is unknown or the CPU lacks the path.
Path parse_path(const std::string& name, const char* what);
// The path used when none is asked for: $FEDGE_SIMD if set, else the best.
// Throws std::invalid_argument when $FEDGE_SIMD names an unusable path.
Path default_path();
CtrKernel kernel_for(Path p);

// Applies the keystreams of keys[0..k) with ops[0..k) to dst[0..n): dst[i]
// takes keystream word offset_words + i of every key. The vector is walked
// once, in L1-sized chunks; all k keystreams are applied to a chunk before
// the next chunk is touched. `threads` >= 1 splits the vector into
// contiguous ranges. Requires offset_words + n <= 2^64 - 1 (caller checks).
void apply_keystreams(Path path, const RoundKeys* keys, const Op* ops, size_t k,
                      uint64_t offset_words, uint32_t* dst, size_t n, int threads);

// Keystream words [offset_words, offset_words + n) of one key into dst.
void keystream(Path path, const RoundKeys& keys, uint64_t offset_words, uint32_t* dst, size_t n);

}  // namespace fedge
