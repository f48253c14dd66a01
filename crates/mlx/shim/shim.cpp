// See shim.h. Each entry point converts its C arguments, calls MLX, and turns
// any exception into a NULL / -1 return with the message kept per thread.
#include "shim.h"

#include <mlx/mlx.h>

#include <cstring>
#include <string>
#include <vector>

namespace mx = mlx::core;

struct mlxs_array {
  mx::array a;
};

namespace {

thread_local std::string last_error;

mx::Dtype to_dtype(int d) {
  switch (d) {
    case MLXS_F32: return mx::float32;
    case MLXS_F16: return mx::float16;
    case MLXS_BF16: return mx::bfloat16;
    case MLXS_U32: return mx::uint32;
    case MLXS_I32: return mx::int32;
    case MLXS_U8: return mx::uint8;
  }
  throw std::invalid_argument("unknown dtype code " + std::to_string(d));
}

int from_dtype(mx::Dtype d) {
  if (d == mx::float32) return MLXS_F32;
  if (d == mx::float16) return MLXS_F16;
  if (d == mx::bfloat16) return MLXS_BF16;
  if (d == mx::uint32) return MLXS_U32;
  if (d == mx::int32) return MLXS_I32;
  if (d == mx::uint8) return MLXS_U8;
  return -1;
}

mx::Shape to_shape(const int32_t* dims, size_t n) { return mx::Shape(dims, dims + n); }

mlxs_array* wrap(mx::array a) { return new mlxs_array{std::move(a)}; }

// Runs `f`, keeping an exception's message instead of letting it unwind into Rust.
template <typename F>
auto guard(F&& f, decltype(f()) on_error) -> decltype(f()) {
  try {
    return f();
  } catch (const std::exception& e) {
    last_error = e.what();
  } catch (...) {
    last_error = "unknown C++ exception";
  }
  return on_error;
}

std::vector<mx::array> unwrap(mlxs_array* const* arrays, size_t n) {
  std::vector<mx::array> v;
  v.reserve(n);
  for (size_t i = 0; i < n; i++) v.push_back(arrays[i]->a);
  return v;
}

}  // namespace

extern "C" {

const char* mlxs_last_error(void) { return last_error.c_str(); }

const char* mlxs_version(void) { return mx::version(); }

int mlxs_has_gpu(void) {
  return guard([] { return mx::is_available(mx::Device::gpu) ? 1 : 0; }, 0);
}

void mlxs_free(mlxs_array* a) { delete a; }

size_t mlxs_active_memory(void) { return mx::get_active_memory(); }

mlxs_array* mlxs_from_data(const void* data, int dtype, const int32_t* shape, size_t ndim) {
  return guard(
      [&] {
        mx::Dtype t = to_dtype(dtype);
        mx::Shape s = to_shape(shape, ndim);
        size_t n = 1;
        for (auto d : s) {
          if (d < 0) throw std::invalid_argument("negative dimension");
          n *= static_cast<size_t>(d);
        }
        // Own copy: the caller's buffer may go away before the graph runs.
        auto* buf = static_cast<char*>(std::malloc(n * t.size() + 1));
        if (!buf) throw std::bad_alloc();
        std::memcpy(buf, data, n * t.size());
        return wrap(mx::array(buf, s, t, [](void* p) { std::free(p); }));
      },
      nullptr);
}

int mlxs_dtype(const mlxs_array* a) { return from_dtype(a->a.dtype()); }

size_t mlxs_shape(const mlxs_array* a, int32_t* out, size_t cap) {
  const auto& s = a->a.shape();
  for (size_t i = 0; i < s.size() && i < cap; i++) out[i] = s[i];
  return s.size();
}

size_t mlxs_size(const mlxs_array* a) { return a->a.size(); }

int mlxs_eval(mlxs_array* const* arrays, size_t n) {
  return guard([&] { mx::eval(unwrap(arrays, n)); return 0; }, -1);
}

int mlxs_async_eval(mlxs_array* const* arrays, size_t n) {
  return guard([&] { mx::async_eval(unwrap(arrays, n)); return 0; }, -1);
}

int mlxs_read(const mlxs_array* a, int dtype, void* out, size_t n) {
  return guard(
      [&] {
        if (a->a.size() != n) throw std::invalid_argument("read: array has " + std::to_string(a->a.size()) + " elements, buffer " + std::to_string(n));
        // Row-major and of the asked type, whatever view `a` is.
        mx::Dtype t = to_dtype(dtype);
        mx::array c = mx::contiguous(mx::astype(a->a, t));
        c.eval();
        std::memcpy(out, c.data<void>(), n * t.size());
        return 0;
      },
      -1);
}

mlxs_array* mlxs_astype(const mlxs_array* a, int dtype) {
  return guard([&] { return wrap(mx::astype(a->a, to_dtype(dtype))); }, nullptr);
}

mlxs_array* mlxs_reshape(const mlxs_array* a, const int32_t* shape, size_t ndim) {
  return guard([&] { return wrap(mx::reshape(a->a, to_shape(shape, ndim))); }, nullptr);
}

mlxs_array* mlxs_transpose(const mlxs_array* a, const int32_t* axes, size_t n) {
  return guard([&] { return wrap(mx::transpose(a->a, std::vector<int>(axes, axes + n))); }, nullptr);
}

mlxs_array* mlxs_slice(const mlxs_array* a, const int32_t* start, const int32_t* stop, size_t n) {
  return guard([&] { return wrap(mx::slice(a->a, to_shape(start, n), to_shape(stop, n))); }, nullptr);
}

mlxs_array* mlxs_slice_update(const mlxs_array* a, const mlxs_array* update, const int32_t* start, const int32_t* stop, size_t n) {
  return guard([&] { return wrap(mx::slice_update(a->a, update->a, to_shape(start, n), to_shape(stop, n))); }, nullptr);
}

mlxs_array* mlxs_concatenate(mlxs_array* const* arrays, size_t n, int axis) {
  return guard([&] { return wrap(mx::concatenate(unwrap(arrays, n), axis)); }, nullptr);
}

mlxs_array* mlxs_take(const mlxs_array* a, const mlxs_array* indices, int axis) {
  return guard([&] { return wrap(mx::take(a->a, indices->a, axis)); }, nullptr);
}

mlxs_array* mlxs_add(const mlxs_array* a, const mlxs_array* b) {
  return guard([&] { return wrap(mx::add(a->a, b->a)); }, nullptr);
}

mlxs_array* mlxs_multiply(const mlxs_array* a, const mlxs_array* b) {
  return guard([&] { return wrap(mx::multiply(a->a, b->a)); }, nullptr);
}

mlxs_array* mlxs_subtract(const mlxs_array* a, const mlxs_array* b) {
  return guard([&] { return wrap(mx::subtract(a->a, b->a)); }, nullptr);
}

mlxs_array* mlxs_gelu_tanh(const mlxs_array* x) {
  return guard(
      [&] {
        const auto& v = x->a;
        auto inner = mx::multiply(mx::array(0.7978845608f), mx::add(v, mx::multiply(mx::array(0.044715f), mx::multiply(v, mx::multiply(v, v)))));
        return wrap(mx::multiply(mx::multiply(mx::array(0.5f), v), mx::add(mx::array(1.0f), mx::tanh(inner))));
      },
      nullptr);
}

mlxs_array* mlxs_tanh(const mlxs_array* x) {
  return guard([&] { return wrap(mx::tanh(x->a)); }, nullptr);
}

mlxs_array* mlxs_softmax(const mlxs_array* x) {
  return guard([&] { return wrap(mx::softmax(x->a, std::vector<int>{-1}, true)); }, nullptr);
}

mlxs_array* mlxs_zeros(const int32_t* shape, size_t ndim, int dtype) {
  return guard([&] { return wrap(mx::zeros(to_shape(shape, ndim), to_dtype(dtype))); }, nullptr);
}

mlxs_array* mlxs_scatter_rows(const mlxs_array* a, const mlxs_array* indices, const mlxs_array* updates) {
  return guard(
      [&] {
        if (a->a.ndim() != 2 || updates->a.ndim() != 2 || indices->a.ndim() != 1 || updates->a.shape(0) != indices->a.shape(0) ||
            updates->a.shape(1) != a->a.shape(1))
          throw std::invalid_argument("scatter_rows: expected a (rows, cols), indices (n), updates (n, cols)");
        return wrap(mx::scatter(a->a, indices->a, mx::expand_dims(mx::astype(updates->a, a->a.dtype()), 1), 0));
      },
      nullptr);
}

mlxs_array* mlxs_dequantize(const mlxs_array* w, const mlxs_array* scales, const mlxs_array* biases, int group_size, int bits) {
  return guard(
      [&] {
        std::optional<mx::array> b = biases->a;
        return wrap(mx::dequantize(w->a, scales->a, b, group_size, bits, "affine"));
      },
      nullptr);
}

mlxs_array* mlxs_silu(const mlxs_array* x) {
  return guard([&] { return wrap(mx::multiply(x->a, mx::sigmoid(x->a))); }, nullptr);
}

mlxs_array* mlxs_matmul(const mlxs_array* a, const mlxs_array* b) {
  return guard([&] { return wrap(mx::matmul(a->a, b->a)); }, nullptr);
}

mlxs_array* mlxs_quantized_matmul(const mlxs_array* x, const mlxs_array* w, const mlxs_array* scales,
                                  const mlxs_array* biases, int transpose, int group_size, int bits) {
  return guard(
      [&] {
        return wrap(mx::quantized_matmul(x->a, w->a, scales->a, biases->a, transpose != 0, group_size, bits, "affine"));
      },
      nullptr);
}

int mlxs_quantize(const mlxs_array* w, int group_size, int bits, mlxs_array** out3) {
  return guard(
      [&] {
        auto q = mx::quantize(w->a, group_size, bits, "affine");
        if (q.size() != 3) throw std::runtime_error("quantize returned " + std::to_string(q.size()) + " arrays");
        for (int i = 0; i < 3; i++) out3[i] = wrap(q[i]);
        return 0;
      },
      -1);
}

mlxs_array* mlxs_rms_norm(const mlxs_array* x, const mlxs_array* weight, float eps) {
  return guard(
      [&] {
        std::optional<mx::array> w;
        if (weight) w = weight->a;
        return wrap(mx::fast::rms_norm(x->a, w, eps));
      },
      nullptr);
}

mlxs_array* mlxs_rope(const mlxs_array* x, int dims, int traditional, float base, float scale, int offset) {
  return guard([&] { return wrap(mx::fast::rope(x->a, dims, traditional != 0, base, scale, offset)); }, nullptr);
}

mlxs_array* mlxs_rope_at(const mlxs_array* x, int traditional, const mlxs_array* positions, const mlxs_array* freqs) {
  return guard(
      [&] {
        int dims = x->a.shape(-1);
        return wrap(mx::fast::rope(x->a, dims, traditional != 0, std::nullopt, 1.0f, positions->a, freqs->a));
      },
      nullptr);
}

mlxs_array* mlxs_sdpa(const mlxs_array* q, const mlxs_array* k, const mlxs_array* v, float scale, const char* mask_mode) {
  return guard(
      [&] { return wrap(mx::fast::scaled_dot_product_attention(q->a, k->a, v->a, scale, mask_mode ? mask_mode : "")); },
      nullptr);
}

mlxs_array* mlxs_sdpa_masked(const mlxs_array* q, const mlxs_array* k, const mlxs_array* v, float scale, const mlxs_array* mask) {
  return guard([&] { return wrap(mx::fast::scaled_dot_product_attention(q->a, k->a, v->a, scale, "array", mask->a)); }, nullptr);
}

}  // extern "C"
