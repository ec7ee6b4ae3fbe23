// pybind11 bindings for fedge._core. Thin on purpose: each function checks
// its buffers (dtype, 1-D, contiguous, writable, lengths) and scalar ranges
// that the C++ relies on, releases the GIL and calls the kernel. The typed,
// documented face is fedge/core.py.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cmath>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

#include "aes.h"
#include "bind_util.h"
#include "out_pool.h"
#include "prg.h"
#include "quant.h"
#include "train.h"
#ifdef FEDGE_HAVE_CUDA
#include "cuda/fedge_cuda.h"
#endif

namespace py = pybind11;
using namespace fedge;

namespace {

using namespace fedge::bind;

py::dict info() {
  py::dict d;
  // The path used when a call names none: $FEDGE_SIMD when it names a usable
  // path, else the fastest this CPU has (an unusable $FEDGE_SIMD makes such
  // calls raise; info() still answers).
  Path chosen = best_path();
  try {
    chosen = default_path();
  } catch (const std::invalid_argument&) {
  }
  d["simd"] = path_name(chosen);
  py::list paths;
  for (Path p : available_paths()) paths.append(path_name(p));
  d["paths"] = paths;
  const char* env = std::getenv("FEDGE_SIMD");
  d["simd_forced"] = env && *env ? py::cast(std::string(env)) : py::none();
#ifdef FEDGE_HAVE_CUDA
  d["cuda_compiled"] = true;
  d["gpus"] = cuda::device_count();
#else
  d["cuda_compiled"] = false;
  d["gpus"] = 0;
#endif
  d["version"] = FEDGE_VERSION;
  return d;
}

py::array_t<uint32_t> prg(const py::bytes& seed, uint64_t n_words, uint64_t offset_words,
                          const std::optional<std::string>& path) {
  const RoundKeys keys = key_arg(seed, "seed");
  const Path p = path_arg(path);
  check_span(offset_words, n_words);
  py::array_t<uint32_t> out(static_cast<py::ssize_t>(n_words));
  uint32_t* dst = out.mutable_data();
  {
    py::gil_scoped_release release;
    keystream(p, keys, offset_words, dst, n_words);
  }
  return out;
}

py::bytes ctr_blocks(const py::bytes& key, const py::bytes& counter, uint64_t n_blocks,
                     const std::optional<std::string>& path) {
  const RoundKeys keys = key_arg(key, "key");
  const std::string c = counter;
  if (c.size() != 16) throw py::value_error("counter must be 16 bytes");
  uint64_t hi = 0, lo = 0;
  for (int i = 0; i < 8; ++i) {
    hi = (hi << 8) | static_cast<uint8_t>(c[i]);
    lo = (lo << 8) | static_cast<uint8_t>(c[8 + i]);
  }
  if (n_blocks > 0 && lo + (n_blocks - 1) < lo) {
    throw py::value_error("counter: the low 64 bits would wrap within n_blocks");
  }
  // 4 * n_blocks words under the PRG's cap: the product cannot wrap, so the
  // buffer below is as long as the kernel writes.
  if (n_blocks > kMaxWords / 4) {
    throw py::value_error("n_blocks must be at most 2^60 (4 * n_blocks words, at most 2^62), got " +
                          std::to_string(n_blocks));
  }
  const CtrKernel kern = kernel_for(path_arg(path));
  std::vector<uint32_t> out(4 * n_blocks);
  {
    py::gil_scoped_release release;
    kern(keys, Op::store, hi, lo, n_blocks, out.data());
  }
  return py::bytes(reinterpret_cast<const char*>(out.data()), out.size() * 4);
}

void apply_masks(const py::buffer& vec, const py::bytes& seeds, const std::vector<int>& signs,
                 uint64_t offset_words, int threads, const std::optional<std::string>& path) {
  Vec<uint32_t> v = vec_arg<uint32_t>(vec, "vec", true);
  const std::string s = seeds;
  if (s.size() % 16 != 0) {
    throw py::value_error("seeds must be k * 16 bytes, got " + std::to_string(s.size()));
  }
  const size_t k = s.size() / 16;
  if (signs.size() != k) {
    throw py::value_error("signs has " + std::to_string(signs.size()) + " entries but there are " +
                          std::to_string(k) + " seeds");
  }
  std::vector<RoundKeys> keys(k);
  std::vector<Op> ops(k);
  for (size_t i = 0; i < k; ++i) {
    keys[i] = expand_key(reinterpret_cast<const uint8_t*>(s.data()) + 16 * i);
    if (signs[i] != 1 && signs[i] != -1) {
      throw py::value_error("signs[" + std::to_string(i) + "] must be +1 or -1, got " +
                            std::to_string(signs[i]));
    }
    ops[i] = signs[i] == 1 ? Op::add : Op::sub;
  }
  if (threads < 1) throw py::value_error("threads must be >= 1, got " + std::to_string(threads));
  check_span(offset_words, v.n);
  const Path p = path_arg(path);
  py::gil_scoped_release release;
  apply_keystreams(p, keys.data(), ops.data(), k, offset_words, v.ptr, v.n, threads);
}

py::object py_quantise(const py::buffer& x, double clip, int bits, const py::bytes& seed, int threads,
                       const std::optional<std::string>& path, const std::optional<py::buffer>& out) {
  Vec<float> v = vec_arg<float>(x, "x", false);
  check_bits(bits);
  check_clip(clip, bits);
  if (threads < 1) throw py::value_error("threads must be >= 1, got " + std::to_string(threads));
  const RoundKeys keys = key_arg(seed, "seed");
  const Path p = path_arg(path);
  py::object result;
  uint32_t* dst;
  // At function scope: the export of `out` must be held until the kernel is
  // done with it, or another thread could resize or free the buffer while the
  // kernel writes into it with the GIL released.
  std::optional<Vec<uint32_t>> o;
  if (out) {
    o = vec_arg<uint32_t>(*out, "out", true);
    same_length(*o, v.n, "out", "x");
    check_disjoint("quantise", {operand(v, "x", false), operand(o, "out", true)});
    dst = o->ptr;
    result = *out;
  } else {
    py::array_t<uint32_t> fresh = pooled_array<uint32_t>(v.n);
    dst = fresh.mutable_data();
    result = std::move(fresh);
  }
  bool finite;
  {
    py::gil_scoped_release release;
    finite = fedge::quantise(p, v.ptr, v.n, clip, bits, keys, dst, threads);
  }
  if (!finite) throw py::value_error("x contains NaN or infinity");
  return result;
}

py::array_t<double> py_dequantise(const py::buffer& total, uint64_t n_summands, double clip,
                               int bits) {
  Vec<uint32_t> t = vec_arg<uint32_t>(total, "total", false);
  check_bits(bits);
  if (n_summands == 0) throw py::value_error("n_summands must be >= 1, got 0");
  check_clip(clip, bits, n_summands);
  py::array_t<double> out(static_cast<py::ssize_t>(t.n));
  double* dst = out.mutable_data();
  {
    py::gil_scoped_release release;
    fedge::dequantise(t.ptr, t.n, n_summands, clip, bits, dst);
  }
  return out;
}

void sgd(const py::buffer& params, const py::buffer& grads, const std::optional<py::buffer>& buf,
         double lr, double momentum, double weight_decay, double dampening, bool nesterov,
         double prox_mu, const std::optional<py::buffer>& global_params,
         const std::optional<py::buffer>& scaffold_c, const std::optional<py::buffer>& scaffold_ci,
         bool first_step) {
  Vec<float> p = vec_arg<float>(params, "params", true);
  Vec<float> g = vec_arg<float>(grads, "grads", false);
  same_length(g, p.n, "grads", "params");
  std::optional<Vec<float>> m, wg, c, ci;
  if (buf) {
    m = vec_arg<float>(*buf, "momentum_buf", true);
    same_length(*m, p.n, "momentum_buf", "params");
  } else if (momentum != 0.0) {
    throw py::value_error("momentum_buf is required when momentum != 0");
  }
  if (global_params) {
    wg = vec_arg<float>(*global_params, "global_params", false);
    same_length(*wg, p.n, "global_params", "params");
  }
  if (scaffold_c) {
    c = vec_arg<float>(*scaffold_c, "scaffold_c", false);
    same_length(*c, p.n, "scaffold_c", "params");
  }
  if (scaffold_ci) {
    ci = vec_arg<float>(*scaffold_ci, "scaffold_ci", false);
    same_length(*ci, p.n, "scaffold_ci", "params");
  }
  check_disjoint("sgd_step",
                 {operand(p, "params", true), operand(m, "momentum_buf", true),
                  operand(g, "grads", false), operand(wg, "global_params", false),
                  operand(c, "scaffold_c", false), operand(ci, "scaffold_ci", false)});
  const SgdArgs a =
      sgd_args(lr, momentum, weight_decay, dampening, nesterov, prox_mu, first_step);
  py::gil_scoped_release release;
  sgd_step(p.ptr, g.ptr, m ? m->ptr : nullptr, p.n, a, wg ? wg->ptr : nullptr,
           c ? c->ptr : nullptr, ci ? ci->ptr : nullptr);
}

void adam(const py::buffer& params, const py::buffer& grads, const py::buffer& exp_avg,
          const py::buffer& exp_avg_sq, int64_t step, double lr, double beta1, double beta2,
          double eps, double weight_decay, bool decoupled) {
  Vec<float> p = vec_arg<float>(params, "params", true);
  Vec<float> g = vec_arg<float>(grads, "grads", false);
  Vec<float> m = vec_arg<float>(exp_avg, "exp_avg", true);
  Vec<float> v = vec_arg<float>(exp_avg_sq, "exp_avg_sq", true);
  same_length(g, p.n, "grads", "params");
  same_length(m, p.n, "exp_avg", "params");
  same_length(v, p.n, "exp_avg_sq", "params");
  check_disjoint("adam_step", {operand(p, "params", true), operand(m, "exp_avg", true),
                               operand(v, "exp_avg_sq", true), operand(g, "grads", false)});
  const AdamArgs a = adam_args(step, lr, beta1, beta2, eps, weight_decay, decoupled);
  py::gil_scoped_release release;
  adam_step(p.ptr, g.ptr, m.ptr, v.ptr, p.n, a);
}

double clip_l2(const py::buffer& vec, double max_norm) {
  Vec<float> v = vec_arg<float>(vec, "vec", true);
  if (!(max_norm > 0.0) || !std::isfinite(max_norm)) {
    throw py::value_error("max_norm must be a finite number > 0, got " + std::to_string(max_norm));
  }
  double norm;
  {
    py::gil_scoped_release release;
    norm = l2_norm(v.ptr, v.n);
  }
  if (!std::isfinite(norm)) throw py::value_error("vec contains NaN or infinity");
  if (norm > max_norm) {
    py::gil_scoped_release release;
    scale(v.ptr, v.n, max_norm / norm);
  }
  return norm;
}

void noise(const py::buffer& vec, double std, const py::bytes& seed,
           const std::optional<std::string>& path) {
  Vec<float> v = vec_arg<float>(vec, "vec", true);
  if (!(std >= 0.0) || !std::isfinite(std)) {
    throw py::value_error("std must be a finite number >= 0, got " + std::to_string(std));
  }
  const RoundKeys keys = key_arg(seed, "seed");
  const Path p = path_arg(path);
  py::gil_scoped_release release;
  add_gaussian_noise(p, v.ptr, v.n, std, keys);
}

}  // namespace

PYBIND11_MODULE(_core, m) {
  m.doc() = "fedge compiled core: AES-CTR PRG and masks, quantisation, optimiser kernels";
  using py::arg;
  const py::none none;
  m.def("info", &info);
  m.def("prg", &prg, arg("seed"), arg("n_words"), arg("offset_words") = 0, py::kw_only(),
        arg("path") = none);
  m.def("ctr_blocks", &ctr_blocks, arg("key"), arg("counter"), arg("n_blocks"), py::kw_only(),
        arg("path") = none);
  m.def("apply_masks", &apply_masks, arg("vec"), arg("seeds"), arg("signs"), py::kw_only(),
        arg("offset_words") = 0, arg("threads") = 1, arg("path") = none);
  m.def("quant_bits", &quant_bits, arg("n_summands"));
  m.def("quantise", &py_quantise, arg("x"), py::kw_only(), arg("clip"), arg("bits"), arg("seed"),
        arg("threads") = 1, arg("path") = none, arg("out") = none);
  m.def("pool_stats", [] { return OutPool::instance().stats(); });
  m.def("release_pool", [] { OutPool::instance().release(); });
  m.def("dequantise", &py_dequantise, arg("total"), py::kw_only(), arg("n_summands"), arg("clip"),
        arg("bits"));
  m.def("sgd_step", &sgd, arg("params"), arg("grads"), arg("momentum_buf").none(true),
        py::kw_only(), arg("lr"), arg("momentum") = 0.0, arg("weight_decay") = 0.0,
        arg("dampening") = 0.0, arg("nesterov") = false, arg("prox_mu") = 0.0,
        arg("global_params").none(true) = none, arg("scaffold_c").none(true) = none,
        arg("scaffold_ci").none(true) = none, arg("first_step") = false);
  m.def("adam_step", &adam, arg("params"), arg("grads"), arg("exp_avg"), arg("exp_avg_sq"),
        py::kw_only(), arg("step"), arg("lr"), arg("beta1") = 0.9, arg("beta2") = 0.999,
        arg("eps") = 1e-8, arg("weight_decay") = 0.0, arg("decoupled") = false);
  m.def("clip_l2", &clip_l2, arg("vec"), arg("max_norm"));
  m.def("add_gaussian_noise", &noise, arg("vec"), py::kw_only(), arg("std"), arg("seed"),
        arg("path") = none);
#ifdef FEDGE_HAVE_CUDA
  bind_cuda(m);
#endif
}
