// pybind11 bindings of the CUDA kernels (built only with FEDGE_HAVE_CUDA).
// Device pointers (torch data_ptr()) and a stream handle arrive as integers;
// fedge/core.py checks the tensors' dtype, device, length and contiguity, so
// here only the scalar ranges the kernels rely on are checked.
#ifdef FEDGE_HAVE_CUDA
#include <pybind11/stl.h>

#include <vector>

#include "bind_util.h"
#include "cuda/fedge_cuda.h"
#include "quant.h"
#include "train_item.h"

namespace fedge::bind {
namespace {

template <typename T>
T* device_ptr(uintptr_t p) {
  return reinterpret_cast<T*>(p);
}

}  // namespace

void bind_cuda(py::module_& m) {
  using py::arg;
  m.def("cuda_device_count", &cuda::device_count);
  m.def(
      "cuda_prg",
      [](int device, uintptr_t stream, uintptr_t out, uint64_t n, const py::bytes& seed,
         uint64_t offset_words) {
        const RoundKeys keys = key_arg(seed, "seed");
        check_span(offset_words, n);
        py::gil_scoped_release release;
        cuda::prg(device, stream, keys, offset_words, device_ptr<uint32_t>(out), n);
      },
      arg("device"), arg("stream"), arg("out_ptr"), arg("n_words"), arg("seed"),
      arg("offset_words"));
  m.def(
      "cuda_apply_masks",
      [](int device, uintptr_t stream, uintptr_t vec, uint64_t n, const py::bytes& seeds,
         const std::vector<int>& signs, uint64_t offset_words) {
        const std::string s = seeds;
        const size_t k = s.size() / 16;
        if (s.size() % 16 != 0 || signs.size() != k) {
          throw py::value_error("seeds must be k * 16 bytes with k signs");
        }
        std::vector<RoundKeys> keys(k);
        for (size_t i = 0; i < k; ++i) {
          keys[i] = expand_key(reinterpret_cast<const uint8_t*>(s.data()) + 16 * i);
          if (signs[i] != 1 && signs[i] != -1) throw py::value_error("signs must be +1 or -1");
        }
        check_span(offset_words, n);
        py::gil_scoped_release release;
        cuda::apply_masks(device, stream, keys.data(), signs.data(), k, offset_words,
                          device_ptr<uint32_t>(vec), n);
      },
      arg("device"), arg("stream"), arg("vec_ptr"), arg("n"), arg("seeds"), arg("signs"),
      arg("offset_words"));
  m.def(
      "cuda_quantise",
      [](int device, uintptr_t stream, uintptr_t x, uintptr_t out, uint64_t n, double clip,
         int bits, const py::bytes& seed) {
        check_bits(bits);
        check_clip(clip, bits);
        const RoundKeys keys = key_arg(seed, "seed");
        py::gil_scoped_release release;
        return cuda::quantise(device, stream, device_ptr<const float>(x),
                              device_ptr<uint32_t>(out), n, clip, quant_scale(bits, clip),
                              static_cast<uint32_t>((uint64_t(1) << bits) - 1), keys);
      },
      arg("device"), arg("stream"), arg("x_ptr"), arg("out_ptr"), arg("n"), arg("clip"),
      arg("bits"), arg("seed"));
  m.def(
      "cuda_dequantise",
      [](int device, uintptr_t stream, uintptr_t total, uintptr_t out, uint64_t n,
         uint64_t n_summands, double clip, int bits) {
        check_bits(bits);
        if (n_summands == 0) throw py::value_error("n_summands must be >= 1, got 0");
        check_clip(clip, bits, n_summands);
        py::gil_scoped_release release;
        cuda::dequantise(device, stream, device_ptr<const uint32_t>(total),
                         device_ptr<double>(out), n, quant_scale(bits, clip),
                         static_cast<double>(n_summands) * clip);
      },
      arg("device"), arg("stream"), arg("total_ptr"), arg("out_ptr"), arg("n"),
      arg("n_summands"), arg("clip"), arg("bits"));
  m.def(
      "cuda_sgd_step",
      [](int device, uintptr_t stream, uintptr_t params, uintptr_t grads, uintptr_t buf,
         uint64_t n, double lr, double momentum, double weight_decay, double dampening,
         bool nesterov, double prox_mu, uintptr_t global_params, uintptr_t scaffold_c,
         uintptr_t scaffold_ci, bool first_step) {
        if (momentum != 0.0 && buf == 0) {
          throw py::value_error("momentum_buf is required when momentum != 0");
        }
        const SgdArgs a =
            sgd_args(lr, momentum, weight_decay, dampening, nesterov, prox_mu, first_step);
        py::gil_scoped_release release;
        cuda::sgd_step(device, stream, device_ptr<float>(params), device_ptr<const float>(grads),
                       device_ptr<float>(buf), n, a, device_ptr<const float>(global_params),
                       device_ptr<const float>(scaffold_c), device_ptr<const float>(scaffold_ci));
      },
      arg("device"), arg("stream"), arg("params"), arg("grads"), arg("momentum_buf"), arg("n"),
      arg("lr"), arg("momentum"), arg("weight_decay"), arg("dampening"), arg("nesterov"),
      arg("prox_mu"), arg("global_params"), arg("scaffold_c"), arg("scaffold_ci"),
      arg("first_step"));
  // The kernels' per-item code run on the host: tests of the CUDA logic
  // that need no GPU (slow; for test-sized inputs).
  m.def(
      "cuda_emulate_prg",
      [](const py::bytes& seed, uint64_t n, uint64_t offset_words) {
        const RoundKeys keys = key_arg(seed, "seed");
        check_span(offset_words, n);
        py::array_t<uint32_t> out(static_cast<py::ssize_t>(n));
        uint32_t* dst = out.mutable_data();
        py::gil_scoped_release release;
        cuda::emulate_prg(keys, offset_words, dst, n);
        return out;
      },
      arg("seed"), arg("n_words"), arg("offset_words"));
  m.def(
      "cuda_emulate_apply_masks",
      [](const py::buffer& vec, const py::bytes& seeds, const std::vector<int>& signs,
         uint64_t offset_words) {
        Vec<uint32_t> v = vec_arg<uint32_t>(vec, "vec", true);
        const std::string s = seeds;
        const size_t k = s.size() / 16;
        if (s.size() % 16 != 0 || signs.size() != k) {
          throw py::value_error("seeds must be k * 16 bytes with k signs");
        }
        std::vector<RoundKeys> keys(k);
        for (size_t i = 0; i < k; ++i) {
          keys[i] = expand_key(reinterpret_cast<const uint8_t*>(s.data()) + 16 * i);
        }
        check_span(offset_words, v.n);
        py::gil_scoped_release release;
        cuda::emulate_apply_masks(keys.data(), signs.data(), k, offset_words, v.ptr, v.n);
      },
      arg("vec"), arg("seeds"), arg("signs"), arg("offset_words"));
  m.def(
      "cuda_emulate_quantise",
      [](const py::buffer& x, double clip, int bits, const py::bytes& seed) {
        Vec<float> v = vec_arg<float>(x, "x", false);
        check_bits(bits);
        check_clip(clip, bits);
        const RoundKeys keys = key_arg(seed, "seed");
        py::array_t<uint32_t> out(static_cast<py::ssize_t>(v.n));
        uint32_t* dst = out.mutable_data();
        bool finite;
        {
          py::gil_scoped_release release;
          finite = cuda::emulate_quantise(v.ptr, dst, v.n, clip, quant_scale(bits, clip),
                                          static_cast<uint32_t>((uint64_t(1) << bits) - 1), keys);
        }
        if (!finite) throw py::value_error("x contains NaN or infinity");
        return out;
      },
      arg("x"), arg("clip"), arg("bits"), arg("seed"));
  m.def(
      "cuda_clip_l2",
      [](int device, uintptr_t stream, uintptr_t vec, uint64_t n, double max_norm) {
        if (!(max_norm > 0.0) || !std::isfinite(max_norm)) {
          throw py::value_error("max_norm must be a finite number > 0");
        }
        double norm;
        {
          py::gil_scoped_release release;
          norm = cuda::clip_l2(device, stream, device_ptr<float>(vec), n, max_norm);
        }
        if (!std::isfinite(norm)) throw py::value_error("vec contains NaN or infinity");
        return norm;
      },
      arg("device"), arg("stream"), arg("vec_ptr"), arg("n"), arg("max_norm"));
  m.def(
      "cuda_add_gaussian_noise",
      [](int device, uintptr_t stream, uintptr_t vec, uint64_t n, double std,
         const py::bytes& seed) {
        if (!(std >= 0.0) || !std::isfinite(std)) {
          throw py::value_error("std must be a finite number >= 0");
        }
        const RoundKeys keys = key_arg(seed, "seed");
        py::gil_scoped_release release;
        cuda::add_gaussian_noise(device, stream, device_ptr<float>(vec), n, std, keys);
      },
      arg("device"), arg("stream"), arg("vec_ptr"), arg("n"), arg("std"), arg("seed"));
  m.def(
      "cuda_emulate_gaussian_noise",
      [](const py::buffer& vec, double std, const py::bytes& seed) {
        Vec<float> v = vec_arg<float>(vec, "vec", true);
        const RoundKeys keys = key_arg(seed, "seed");
        py::gil_scoped_release release;
        cuda::emulate_gaussian_noise(v.ptr, v.n, std, keys);
      },
      arg("vec"), arg("std"), arg("seed"));
  m.def(
      "cuda_adam_step",
      [](int device, uintptr_t stream, uintptr_t params, uintptr_t grads, uintptr_t exp_avg,
         uintptr_t exp_avg_sq, uint64_t n, int64_t step, double lr, double beta1, double beta2,
         double eps, double weight_decay, bool decoupled) {
        const AdamArgs a = adam_args(step, lr, beta1, beta2, eps, weight_decay, decoupled);
        py::gil_scoped_release release;
        cuda::adam_step(device, stream, device_ptr<float>(params), device_ptr<const float>(grads),
                        device_ptr<float>(exp_avg), device_ptr<float>(exp_avg_sq), n, a);
      },
      arg("device"), arg("stream"), arg("params"), arg("grads"), arg("exp_avg"),
      arg("exp_avg_sq"), arg("n"), arg("step"), arg("lr"), arg("beta1"), arg("beta2"),
      arg("eps"), arg("weight_decay"), arg("decoupled"));
}

}  // namespace fedge::bind
#endif  // FEDGE_HAVE_CUDA
