// C ABI over the MLX C++ API, for the Rust wrapper in ../src/lib.rs.
//
// Arrays are opaque heap handles (an mlx::core::array each, shared with the
// graph that uses it); every handle returned must be freed exactly once with
// mlxs_free. Operations build MLX's lazy graph; mlxs_eval and mlxs_read run
// it. No C++ exception crosses this boundary: a failing call returns NULL (or
// -1) and mlxs_last_error() gives the message, per thread.
#pragma once
#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef struct mlxs_array mlxs_array;

// Element types (mirrored by `Dtype` in lib.rs).
enum { MLXS_F32 = 0, MLXS_F16 = 1, MLXS_BF16 = 2, MLXS_U32 = 3, MLXS_I32 = 4, MLXS_U8 = 5 };

const char* mlxs_last_error(void);
const char* mlxs_version(void);
// 1 when MLX runs on a GPU (Metal or CUDA) by default, else 0.
int mlxs_has_gpu(void);

// Bytes MLX holds for live arrays (mlx::core::get_active_memory).
size_t mlxs_active_memory(void);

void mlxs_free(mlxs_array* a);
// Copies `data` (row-major, `shape` of `ndim` dims, element type `dtype`).
mlxs_array* mlxs_from_data(const void* data, int dtype, const int32_t* shape, size_t ndim);
int mlxs_dtype(const mlxs_array* a);
// Writes up to `cap` dims into `out`; returns the number of dims.
size_t mlxs_shape(const mlxs_array* a, int32_t* out, size_t cap);
size_t mlxs_size(const mlxs_array* a);
int mlxs_eval(mlxs_array* const* arrays, size_t n);
// Starts evaluation and returns at once (mlx::core::async_eval).
int mlxs_async_eval(mlxs_array* const* arrays, size_t n);
// Evaluates `a`, converts it to `dtype` and copies its `n` elements to `out`.
int mlxs_read(const mlxs_array* a, int dtype, void* out, size_t n);

mlxs_array* mlxs_astype(const mlxs_array* a, int dtype);
mlxs_array* mlxs_reshape(const mlxs_array* a, const int32_t* shape, size_t ndim);
mlxs_array* mlxs_transpose(const mlxs_array* a, const int32_t* axes, size_t n);
mlxs_array* mlxs_slice(const mlxs_array* a, const int32_t* start, const int32_t* stop, size_t n);
// `a` with elements start[i]..stop[i] replaced by `update` (a new array;
// MLX reuses `a`'s buffer when nothing else holds it: the KV cache write).
mlxs_array* mlxs_slice_update(const mlxs_array* a, const mlxs_array* update, const int32_t* start, const int32_t* stop, size_t n);
mlxs_array* mlxs_concatenate(mlxs_array* const* arrays, size_t n, int axis);
mlxs_array* mlxs_take(const mlxs_array* a, const mlxs_array* indices, int axis);
mlxs_array* mlxs_add(const mlxs_array* a, const mlxs_array* b);
mlxs_array* mlxs_multiply(const mlxs_array* a, const mlxs_array* b);
mlxs_array* mlxs_subtract(const mlxs_array* a, const mlxs_array* b);
// x * sigmoid(x)
mlxs_array* mlxs_silu(const mlxs_array* x);
// GELU, tanh approximation.
mlxs_array* mlxs_gelu_tanh(const mlxs_array* x);
mlxs_array* mlxs_tanh(const mlxs_array* x);
// Softmax over the last axis, computed in float32 whatever the input type.
mlxs_array* mlxs_softmax(const mlxs_array* x);
mlxs_array* mlxs_zeros(const int32_t* shape, size_t ndim, int dtype);
// `a` (rows, cols) with rows `indices` (int32, n) replaced by `updates`
// (n, cols); like slice_update, MLX reuses `a`'s buffer when it can.
mlxs_array* mlxs_scatter_rows(const mlxs_array* a, const mlxs_array* indices, const mlxs_array* updates);
// The float values of affine-quantized weights (see mlxs_quantized_matmul).
mlxs_array* mlxs_dequantize(const mlxs_array* w, const mlxs_array* scales, const mlxs_array* biases, int group_size, int bits);
mlxs_array* mlxs_matmul(const mlxs_array* a, const mlxs_array* b);
// x @ dequantize(w)^T (transpose = 1) for MLX affine weights: `w` packs
// `bits`-bit values in uint32 words, `scales` and `biases` hold one value per
// group of `group_size` along each row.
mlxs_array* mlxs_quantized_matmul(const mlxs_array* x, const mlxs_array* w, const mlxs_array* scales,
                                  const mlxs_array* biases, int transpose, int group_size, int bits);
// Quantizes a float matrix along its last axis; writes w, scales, biases.
int mlxs_quantize(const mlxs_array* w, int group_size, int bits, mlxs_array** out3);
// `weight` may be NULL.
mlxs_array* mlxs_rms_norm(const mlxs_array* x, const mlxs_array* weight, float eps);
// Rotates the first `dims` features of x (..., seq, head_dim) for positions
// offset, offset + 1, ...; traditional = adjacent pairs, else halves.
mlxs_array* mlxs_rope(const mlxs_array* x, int dims, int traditional, float base, float scale, int offset);
// Rotates x (n, heads, 1, head_dim) of n tokens, token i at positions[i]
// (int32, n), with per-pair frequencies `freqs` (head_dim / 2): angle =
// position / freqs[j].
mlxs_array* mlxs_rope_at(const mlxs_array* x, int traditional, const mlxs_array* positions, const mlxs_array* freqs);
// softmax(q k^T * scale [+ causal mask]) v over (batch, heads, seq, head_dim);
// k and v may have fewer heads (grouped-query attention). mask_mode: "" or "causal".
mlxs_array* mlxs_sdpa(const mlxs_array* q, const mlxs_array* k, const mlxs_array* v, float scale, const char* mask_mode);
// The same with an additive mask broadcast against the scores (heads, queries, keys).
mlxs_array* mlxs_sdpa_masked(const mlxs_array* q, const mlxs_array* k, const mlxs_array* v, float scale, const mlxs_array* mask);

#ifdef __cplusplus
}
#endif
