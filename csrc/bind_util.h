// Buffer and argument checks shared by the binding files (module.cpp and
// module_cuda.cpp). Header-only, internal to the extension.
#pragma once

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cfloat>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <initializer_list>
#include <optional>
#include <stdexcept>
#include <string>
#include <type_traits>

#include "aes.h"
#include "prg.h"
#include "quant.h"
#include "train_item.h"

namespace fedge::bind {

namespace py = pybind11;

// A checked view of a 1-D contiguous numpy-compatible buffer. The
// buffer_info keeps the exporter's view alive; it must be destroyed with the
// GIL held (i.e. outside any gil_scoped_release block).
template <typename T>
struct Vec {
  py::buffer_info info;
  T* ptr = nullptr;
  size_t n = 0;
};

template <typename T>
constexpr const char* dtype_name() {
  if constexpr (std::is_same_v<T, float>) return "float32";
  if constexpr (std::is_same_v<T, double>) return "float64";
  return "uint32";
}

template <typename T>
bool format_matches(const std::string& fmt) {
  std::string f = fmt;
  if (!f.empty() && (f[0] == '<' || f[0] == '=' || f[0] == '@')) f = f.substr(1);
  if constexpr (std::is_same_v<T, float>) return f == "f";
  if constexpr (std::is_same_v<T, double>) return f == "d";
  if constexpr (std::is_same_v<T, uint32_t>) return f == "I" || (f == "L" && sizeof(long) == 4);
  return false;
}

template <typename T>
Vec<T> vec_arg(const py::buffer& b, const char* name, bool writable) {
  Vec<T> v{b.request(false)};
  if (!format_matches<T>(v.info.format) || v.info.itemsize != static_cast<py::ssize_t>(sizeof(T))) {
    throw py::type_error(std::string(name) + " must have dtype " + dtype_name<T>() +
                         " (buffer format '" + v.info.format + "')");
  }
  if (v.info.ndim != 1) {
    throw py::value_error(std::string(name) + " must be 1-D, got " + std::to_string(v.info.ndim) +
                          " dimensions");
  }
  if (v.info.shape[0] > 1 && v.info.strides[0] != static_cast<py::ssize_t>(sizeof(T))) {
    throw py::value_error(std::string(name) + " must be C-contiguous (stride " +
                          std::to_string(v.info.strides[0]) + " bytes)");
  }
  // The kernels load and store whole T elements: an address that is no
  // multiple of alignof(T) (np.frombuffer(..., offset=1) makes one) is
  // undefined behaviour even where x86 happens to tolerate it. An empty buffer
  // is never read, and numpy calls it aligned.
  if (v.info.shape[0] > 0 && reinterpret_cast<uintptr_t>(v.info.ptr) % alignof(T) != 0) {
    throw py::value_error(std::string(name) + " is not aligned: its address is not a multiple of " +
                          std::to_string(alignof(T)) + " bytes, as a " + dtype_name<T>() +
                          " buffer's must be; pass an aligned copy (numpy.array(" + name + "))");
  }
  if (writable && v.info.readonly) {
    throw py::value_error(std::string(name) + " is read-only but is written in place");
  }
  v.ptr = static_cast<T*>(v.info.ptr);
  v.n = static_cast<size_t>(v.info.shape[0]);
  return v;
}

template <typename T>
void same_length(const Vec<T>& v, size_t n, const char* name, const char* ref) {
  if (v.n != n) {
    throw py::value_error(std::string(name) + " has " + std::to_string(v.n) + " elements but " +
                          ref + " has " + std::to_string(n));
  }
}

inline RoundKeys key_arg(const py::bytes& seed, const char* name) {
  const std::string s = seed;
  if (s.size() != 16) {
    throw py::value_error(std::string(name) + " must be 16 bytes, got " + std::to_string(s.size()));
  }
  return expand_key(reinterpret_cast<const uint8_t*>(s.data()));
}

inline Path path_arg(const std::optional<std::string>& path) {
  return path ? parse_path(*path, "path") : default_path();
}

// The PRG window, words [offset_words, offset_words + n_words), must end at or
// below word 2^62: block indices (word / 4) then stay far below the wrap of
// the kernels' 64-bit counter.
constexpr uint64_t kMaxWords = uint64_t(1) << 62;

inline void check_span(uint64_t offset_words, uint64_t n_words) {
  // Two comparisons instead of the sum: offset_words + n_words may wrap.
  if (offset_words > kMaxWords || n_words > kMaxWords - offset_words) {
    throw py::value_error("offset_words + n_words must be at most 2^62 (offset_words=" +
                          std::to_string(offset_words) + ", n_words=" + std::to_string(n_words) +
                          ")");
  }
}

// One operand of a kernel, by its bytes, for the aliasing check below.
struct Operand {
  const char* name;
  const void* ptr;  // null: the operand is absent
  size_t bytes;
  bool written;
};

template <typename T>
Operand operand(const Vec<T>& v, const char* name, bool written) {
  return {name, v.ptr, sizeof(T) * v.n, written};
}

template <typename T>
Operand operand(const std::optional<Vec<T>>& v, const char* name, bool written) {
  return v ? operand(*v, name, written) : Operand{name, nullptr, 0, written};
}

// The kernels read and write element by element, vectorised: a buffer they
// write must share no byte with any other operand, or the result depends on
// the order of loads and stores (and differs between paths). Operands that
// are only read may alias each other.
inline void check_disjoint(const char* function, std::initializer_list<Operand> operands) {
  for (auto a = operands.begin(); a != operands.end(); ++a) {
    for (auto b = a + 1; b != operands.end(); ++b) {
      if (!a->written && !b->written) continue;
      if (a->ptr == nullptr || b->ptr == nullptr || a->bytes == 0 || b->bytes == 0) continue;
      const auto a0 = reinterpret_cast<uintptr_t>(a->ptr);
      const auto b0 = reinterpret_cast<uintptr_t>(b->ptr);
      if (a0 < b0 + b->bytes && b0 < a0 + a->bytes) {
        const Operand& w = b->written ? *b : *a;
        const Operand& o = b->written ? *a : *b;
        throw py::value_error(std::string(w.name) + " overlaps " + o.name + " in memory; " +
                              function + " writes " + w.name +
                              " in place, so it needs a buffer of its own");
      }
    }
  }
}

// A double as "%.6g" (std::to_string prints 1e-310 as 0.000000).
inline std::string number(double v) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.6g", v);
  return buf;
}

inline void check_bits(int bits) {
  if (bits < 1 || bits > 31) {
    throw py::value_error("bits must be in [1, 31], got " + std::to_string(bits));
  }
}

// After check_bits. The scale s = (2^b - 1)/(2 clip) must be a finite number
// > 0: a clip so large that 2 clip overflows gives s = 0 (every q is 0 and
// dequantise returns NaN), a subnormal one s = inf (every q is 2^b - 1). A
// sum of n_summands vectors spans 2 n_summands clip, which must be finite too.
inline void check_clip(double clip, int bits, uint64_t n_summands = 1) {
  if (!(clip > 0.0) || !std::isfinite(clip)) {
    throw py::value_error("clip must be a finite number > 0, got " + number(clip));
  }
  const double n = static_cast<double>(n_summands);
  const double s = quant_scale(bits, clip);
  if (!(s > 0.0) || !std::isfinite(s) || !std::isfinite(2.0 * n * clip)) {
    const double qmax = static_cast<double>((uint64_t(1) << bits) - 1);
    const double lo = qmax / DBL_MAX / 2.0, hi = DBL_MAX / 2.0 / n;
    throw py::value_error(
        "clip=" + number(clip) + " is out of range for bits=" + std::to_string(bits) +
        " and n_summands=" + std::to_string(n_summands) +
        ": the scale (2^bits - 1)/(2*clip) must be a finite number > 0 and the sum's range "
        "2*n_summands*clip finite, so clip must be within about [" + number(lo) + ", " +
        number(hi) + "]");
  }
}

#ifdef FEDGE_HAVE_CUDA
// Adds the cuda_* functions (module_cuda.cpp).
void bind_cuda(py::module_& m);
#endif

// Optimiser arguments, checked once for the CPU and the CUDA bindings alike.
inline SgdArgs sgd_args(double lr, double momentum, double weight_decay, double dampening,
                        bool nesterov, double prox_mu, bool first_step) {
  SgdArgs a;
  a.lr = lr;
  a.momentum = momentum;
  a.weight_decay = weight_decay;
  a.dampening = dampening;
  a.nesterov = nesterov;
  a.prox_mu = prox_mu;
  a.first_step = first_step;
  return a;
}

inline AdamArgs adam_args(int64_t step, double lr, double beta1, double beta2, double eps,
                          double weight_decay, bool decoupled) {
  if (step < 1) throw py::value_error("step must be >= 1, got " + std::to_string(step));
  AdamArgs a;
  a.lr = lr;
  a.beta1 = beta1;
  a.beta2 = beta2;
  a.eps = eps;
  a.weight_decay = weight_decay;
  a.step = step;
  a.decoupled = decoupled;
  return a;
}

}  // namespace fedge::bind
