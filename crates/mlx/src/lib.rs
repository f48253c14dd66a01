//! MLX arrays and the operations the `mlx` backend needs, safely: an
//! [`Array`] owns one handle to an MLX array (freed on drop); operations
//! build MLX's lazy graph and return new arrays; [`eval`] or a read runs it.
//! MLX's C++ exceptions come back as [`MlxError::Mlx`], never as aborts.
//!
//! MLX is libmlx from PyPI's MLX wheels (`mlx-cpu` on Linux, `mlx-cuda-12/13`
//! on NVIDIA, `mlx-metal` on macOS), reached through the C++ shim in
//! `shim/`. When the build found no MLX, every operation returns
//! [`MlxError::Unavailable`].

use std::ffi::{c_char, c_int, CStr, CString};
use std::ptr::NonNull;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MlxError {
    #[error("MLX: {0}")]
    Mlx(String),
    #[error("the MLX backend is not built in (run scripts/fetch-mlx.sh, or set MLX_DIR to an MLX wheel's mlx folder, and rebuild)")]
    Unavailable,
    #[error("{0}")]
    Invalid(String),
}

pub type Result<T> = std::result::Result<T, MlxError>;

/// Element types the backend exchanges with MLX.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dtype {
    F32 = 0,
    F16 = 1,
    Bf16 = 2,
    U32 = 3,
    I32 = 4,
    U8 = 5,
}

impl Dtype {
    pub fn size(self) -> usize {
        match self {
            Dtype::F32 | Dtype::U32 | Dtype::I32 => 4,
            Dtype::F16 | Dtype::Bf16 => 2,
            Dtype::U8 => 1,
        }
    }

    fn from_code(c: c_int) -> Option<Dtype> {
        [Dtype::F32, Dtype::F16, Dtype::Bf16, Dtype::U32, Dtype::I32, Dtype::U8].into_iter().find(|d| *d as c_int == c)
    }
}

/// Plain data that maps onto an MLX element type.
pub trait Element: Copy {
    const DTYPE: Dtype;
}
impl Element for f32 {
    const DTYPE: Dtype = Dtype::F32;
}
impl Element for half::f16 {
    const DTYPE: Dtype = Dtype::F16;
}
impl Element for half::bf16 {
    const DTYPE: Dtype = Dtype::Bf16;
}
impl Element for u32 {
    const DTYPE: Dtype = Dtype::U32;
}
impl Element for i32 {
    const DTYPE: Dtype = Dtype::I32;
}
impl Element for u8 {
    const DTYPE: Dtype = Dtype::U8;
}

#[repr(C)]
struct RawArray {
    _private: [u8; 0],
}

#[cfg(mlx)]
mod ffi {
    use super::*;
    extern "C" {
        pub fn mlxs_last_error() -> *const c_char;
        pub fn mlxs_version() -> *const c_char;
        pub fn mlxs_has_gpu() -> c_int;
        pub fn mlxs_free(a: *mut RawArray);
        pub fn mlxs_from_data(data: *const u8, dtype: c_int, shape: *const i32, ndim: usize) -> *mut RawArray;
        pub fn mlxs_dtype(a: *const RawArray) -> c_int;
        pub fn mlxs_shape(a: *const RawArray, out: *mut i32, cap: usize) -> usize;
        pub fn mlxs_eval(arrays: *const *mut RawArray, n: usize) -> c_int;
        pub fn mlxs_async_eval(arrays: *const *mut RawArray, n: usize) -> c_int;
        pub fn mlxs_read(a: *const RawArray, dtype: c_int, out: *mut u8, n: usize) -> c_int;
        pub fn mlxs_astype(a: *const RawArray, dtype: c_int) -> *mut RawArray;
        pub fn mlxs_reshape(a: *const RawArray, shape: *const i32, ndim: usize) -> *mut RawArray;
        pub fn mlxs_transpose(a: *const RawArray, axes: *const i32, n: usize) -> *mut RawArray;
        pub fn mlxs_slice(a: *const RawArray, start: *const i32, stop: *const i32, n: usize) -> *mut RawArray;
        pub fn mlxs_active_memory() -> usize;
        pub fn mlxs_slice_update(a: *const RawArray, u: *const RawArray, start: *const i32, stop: *const i32, n: usize) -> *mut RawArray;
        pub fn mlxs_concatenate(arrays: *const *mut RawArray, n: usize, axis: c_int) -> *mut RawArray;
        pub fn mlxs_take(a: *const RawArray, indices: *const RawArray, axis: c_int) -> *mut RawArray;
        pub fn mlxs_add(a: *const RawArray, b: *const RawArray) -> *mut RawArray;
        pub fn mlxs_multiply(a: *const RawArray, b: *const RawArray) -> *mut RawArray;
        pub fn mlxs_silu(a: *const RawArray) -> *mut RawArray;
        pub fn mlxs_matmul(a: *const RawArray, b: *const RawArray) -> *mut RawArray;
        pub fn mlxs_quantized_matmul(
            x: *const RawArray,
            w: *const RawArray,
            scales: *const RawArray,
            biases: *const RawArray,
            transpose: c_int,
            group_size: c_int,
            bits: c_int,
        ) -> *mut RawArray;
        pub fn mlxs_quantize(w: *const RawArray, group_size: c_int, bits: c_int, out3: *mut *mut RawArray) -> c_int;
        pub fn mlxs_rms_norm(x: *const RawArray, weight: *const RawArray, eps: f32) -> *mut RawArray;
        pub fn mlxs_rope(x: *const RawArray, dims: c_int, traditional: c_int, base: f32, scale: f32, offset: c_int) -> *mut RawArray;
        pub fn mlxs_sdpa(q: *const RawArray, k: *const RawArray, v: *const RawArray, scale: f32, mask: *const c_char) -> *mut RawArray;
    }
}

/// Without MLX: the same entry points, each failing as unavailable.
#[cfg(not(mlx))]
#[allow(clippy::missing_safety_doc)]
mod ffi {
    use super::*;
    macro_rules! unavailable {
        ($($name:ident($($arg:ident: $ty:ty),*) -> $ret:ty = $val:expr;)*) => {
            $(pub unsafe fn $name($(_: $ty),*) -> $ret { $val })*
        };
    }
    pub unsafe fn mlxs_last_error() -> *const c_char {
        c"".as_ptr()
    }
    unavailable! {
        mlxs_version() -> *const c_char = c"".as_ptr();
        mlxs_has_gpu() -> c_int = 0;
        mlxs_free(a: *mut RawArray) -> () = ();
        mlxs_from_data(d: *const u8, t: c_int, s: *const i32, n: usize) -> *mut RawArray = std::ptr::null_mut();
        mlxs_dtype(a: *const RawArray) -> c_int = -1;
        mlxs_shape(a: *const RawArray, o: *mut i32, c: usize) -> usize = 0;
        mlxs_eval(a: *const *mut RawArray, n: usize) -> c_int = -1;
        mlxs_async_eval(a: *const *mut RawArray, n: usize) -> c_int = -1;
        mlxs_read(a: *const RawArray, t: c_int, o: *mut u8, n: usize) -> c_int = -1;
        mlxs_astype(a: *const RawArray, t: c_int) -> *mut RawArray = std::ptr::null_mut();
        mlxs_reshape(a: *const RawArray, s: *const i32, n: usize) -> *mut RawArray = std::ptr::null_mut();
        mlxs_transpose(a: *const RawArray, s: *const i32, n: usize) -> *mut RawArray = std::ptr::null_mut();
        mlxs_slice(a: *const RawArray, s: *const i32, e: *const i32, n: usize) -> *mut RawArray = std::ptr::null_mut();
        mlxs_active_memory() -> usize = 0;
        mlxs_slice_update(a: *const RawArray, u: *const RawArray, s: *const i32, e: *const i32, n: usize) -> *mut RawArray = std::ptr::null_mut();
        mlxs_concatenate(a: *const *mut RawArray, n: usize, x: c_int) -> *mut RawArray = std::ptr::null_mut();
        mlxs_take(a: *const RawArray, i: *const RawArray, x: c_int) -> *mut RawArray = std::ptr::null_mut();
        mlxs_add(a: *const RawArray, b: *const RawArray) -> *mut RawArray = std::ptr::null_mut();
        mlxs_multiply(a: *const RawArray, b: *const RawArray) -> *mut RawArray = std::ptr::null_mut();
        mlxs_silu(a: *const RawArray) -> *mut RawArray = std::ptr::null_mut();
        mlxs_matmul(a: *const RawArray, b: *const RawArray) -> *mut RawArray = std::ptr::null_mut();
        mlxs_quantized_matmul(x: *const RawArray, w: *const RawArray, s: *const RawArray, b: *const RawArray, t: c_int, g: c_int, n: c_int) -> *mut RawArray = std::ptr::null_mut();
        mlxs_quantize(w: *const RawArray, g: c_int, b: c_int, o: *mut *mut RawArray) -> c_int = -1;
        mlxs_rms_norm(x: *const RawArray, w: *const RawArray, e: f32) -> *mut RawArray = std::ptr::null_mut();
        mlxs_rope(x: *const RawArray, d: c_int, t: c_int, b: f32, s: f32, o: c_int) -> *mut RawArray = std::ptr::null_mut();
        mlxs_sdpa(q: *const RawArray, k: *const RawArray, v: *const RawArray, s: f32, m: *const c_char) -> *mut RawArray = std::ptr::null_mut();
    }
}

/// Whether this build links MLX.
pub fn available() -> bool {
    cfg!(mlx)
}

/// MLX's version string ("0.32.4"), or `None` without MLX.
pub fn version() -> Option<String> {
    available().then(|| unsafe { CStr::from_ptr(ffi::mlxs_version()) }.to_string_lossy().into_owned())
}

/// Bytes MLX holds for live arrays (0 without MLX).
pub fn active_memory() -> usize {
    unsafe { ffi::mlxs_active_memory() }
}

/// Whether MLX has a GPU here (Metal or CUDA).
pub fn has_gpu() -> bool {
    unsafe { ffi::mlxs_has_gpu() == 1 }
}

fn last_error() -> MlxError {
    if !available() {
        return MlxError::Unavailable;
    }
    MlxError::Mlx(unsafe { CStr::from_ptr(ffi::mlxs_last_error()) }.to_string_lossy().into_owned())
}

fn check(rc: c_int) -> Result<()> {
    if rc == 0 {
        Ok(())
    } else {
        Err(last_error())
    }
}

/// One MLX array (a node of MLX's lazy graph, or its evaluated data).
/// `Send`: MLX reference-counts arrays atomically; not `Sync`, since
/// evaluating one graph from two threads at once is not supported.
pub struct Array(NonNull<RawArray>);

unsafe impl Send for Array {}

impl Drop for Array {
    fn drop(&mut self) {
        unsafe { ffi::mlxs_free(self.0.as_ptr()) }
    }
}

impl std::fmt::Debug for Array {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Array({:?}, {:?})", self.dtype(), self.shape())
    }
}

fn dims(shape: &[usize]) -> Result<Vec<i32>> {
    shape.iter().map(|&d| i32::try_from(d).map_err(|_| MlxError::Invalid(format!("dimension {d} is too large")))).collect()
}

impl Array {
    fn wrap(p: *mut RawArray) -> Result<Array> {
        NonNull::new(p).map(Array).ok_or_else(last_error)
    }

    /// A copy of `data` with the given shape (row-major).
    pub fn from_slice<T: Element>(data: &[T], shape: &[usize]) -> Result<Array> {
        let n: usize = shape.iter().product();
        if n != data.len() {
            return Err(MlxError::Invalid(format!("shape {shape:?} holds {n} elements, data has {}", data.len())));
        }
        let shape = dims(shape)?;
        Array::wrap(unsafe { ffi::mlxs_from_data(data.as_ptr().cast(), T::DTYPE as c_int, shape.as_ptr(), shape.len()) })
    }

    /// Raw bytes of element type `dtype` (weights as a file stores them).
    pub fn from_bytes(bytes: &[u8], dtype: Dtype, shape: &[usize]) -> Result<Array> {
        let n: usize = shape.iter().product();
        if n * dtype.size() != bytes.len() {
            return Err(MlxError::Invalid(format!("shape {shape:?} of {dtype:?} needs {} bytes, got {}", n * dtype.size(), bytes.len())));
        }
        let shape = dims(shape)?;
        Array::wrap(unsafe { ffi::mlxs_from_data(bytes.as_ptr(), dtype as c_int, shape.as_ptr(), shape.len()) })
    }

    pub fn dtype(&self) -> Option<Dtype> {
        Dtype::from_code(unsafe { ffi::mlxs_dtype(self.0.as_ptr()) })
    }

    pub fn shape(&self) -> Vec<usize> {
        let mut out = [0i32; 8];
        let n = unsafe { ffi::mlxs_shape(self.0.as_ptr(), out.as_mut_ptr(), out.len()) };
        if n > out.len() {
            let mut v = vec![0i32; n];
            unsafe { ffi::mlxs_shape(self.0.as_ptr(), v.as_mut_ptr(), n) };
            return v.into_iter().map(|d| d as usize).collect();
        }
        out[..n].iter().map(|&d| d as usize).collect()
    }

    pub fn len(&self) -> usize {
        self.shape().iter().product()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Evaluates (if needed) and copies the elements out, converted to `T`.
    pub fn to_vec<T: Element + Default>(&self) -> Result<Vec<T>> {
        let mut v = vec![T::default(); self.len()];
        check(unsafe { ffi::mlxs_read(self.0.as_ptr(), T::DTYPE as c_int, v.as_mut_ptr().cast(), v.len()) })?;
        Ok(v)
    }

    pub fn to_vec_f32(&self) -> Result<Vec<f32>> {
        self.to_vec()
    }

    fn raw(&self) -> *const RawArray {
        self.0.as_ptr()
    }

    pub fn astype(&self, dtype: Dtype) -> Result<Array> {
        Array::wrap(unsafe { ffi::mlxs_astype(self.raw(), dtype as c_int) })
    }

    pub fn reshape(&self, shape: &[usize]) -> Result<Array> {
        let s = dims(shape)?;
        Array::wrap(unsafe { ffi::mlxs_reshape(self.raw(), s.as_ptr(), s.len()) })
    }

    pub fn transpose(&self, axes: &[usize]) -> Result<Array> {
        let a = dims(axes)?;
        Array::wrap(unsafe { ffi::mlxs_transpose(self.raw(), a.as_ptr(), a.len()) })
    }

    /// Elements `start[i]..stop[i]` along each axis.
    pub fn slice(&self, start: &[usize], stop: &[usize]) -> Result<Array> {
        if start.len() != stop.len() {
            return Err(MlxError::Invalid("slice: start and stop differ in length".into()));
        }
        let (a, b) = (dims(start)?, dims(stop)?);
        Array::wrap(unsafe { ffi::mlxs_slice(self.raw(), a.as_ptr(), b.as_ptr(), a.len()) })
    }

    /// This array with elements `start[i]..stop[i]` replaced by `update`
    /// (how a KV cache preallocated in MLX takes each step's keys).
    pub fn slice_update(&self, update: &Array, start: &[usize], stop: &[usize]) -> Result<Array> {
        if start.len() != stop.len() {
            return Err(MlxError::Invalid("slice_update: start and stop differ in length".into()));
        }
        let (a, b) = (dims(start)?, dims(stop)?);
        Array::wrap(unsafe { ffi::mlxs_slice_update(self.raw(), update.raw(), a.as_ptr(), b.as_ptr(), a.len()) })
    }

    /// Rows (along `axis`) picked by `indices` (an embedding lookup).
    pub fn take(&self, indices: &Array, axis: i32) -> Result<Array> {
        Array::wrap(unsafe { ffi::mlxs_take(self.raw(), indices.raw(), axis) })
    }

    pub fn add(&self, other: &Array) -> Result<Array> {
        Array::wrap(unsafe { ffi::mlxs_add(self.raw(), other.raw()) })
    }

    pub fn multiply(&self, other: &Array) -> Result<Array> {
        Array::wrap(unsafe { ffi::mlxs_multiply(self.raw(), other.raw()) })
    }

    /// x * sigmoid(x)
    pub fn silu(&self) -> Result<Array> {
        Array::wrap(unsafe { ffi::mlxs_silu(self.raw()) })
    }

    pub fn matmul(&self, other: &Array) -> Result<Array> {
        Array::wrap(unsafe { ffi::mlxs_matmul(self.raw(), other.raw()) })
    }
}

/// Runs the graphs behind `arrays`.
pub fn eval(arrays: &[&Array]) -> Result<()> {
    let raw: Vec<*mut RawArray> = arrays.iter().map(|a| a.0.as_ptr()).collect();
    check(unsafe { ffi::mlxs_eval(raw.as_ptr(), raw.len()) })
}

/// Starts running the graphs behind `arrays` and returns at once, so host
/// work overlaps the computation; a later `eval` or read waits for it.
pub fn async_eval(arrays: &[&Array]) -> Result<()> {
    let raw: Vec<*mut RawArray> = arrays.iter().map(|a| a.0.as_ptr()).collect();
    check(unsafe { ffi::mlxs_async_eval(raw.as_ptr(), raw.len()) })
}

pub fn concatenate(arrays: &[&Array], axis: i32) -> Result<Array> {
    let raw: Vec<*mut RawArray> = arrays.iter().map(|a| a.0.as_ptr()).collect();
    Array::wrap(unsafe { ffi::mlxs_concatenate(raw.as_ptr(), raw.len(), axis) })
}

/// MLX affine-quantized weights: `bits`-bit values packed in u32 words,
/// one scale and bias per `group_size` values of a row (the format of
/// mlx-community model folders).
pub struct QuantizedWeight {
    pub w: Array,
    pub scales: Array,
    pub biases: Array,
    pub group_size: usize,
    pub bits: usize,
}

impl QuantizedWeight {
    /// Quantizes a float matrix (rows = output features) with MLX itself.
    pub fn quantize(w: &Array, group_size: usize, bits: usize) -> Result<QuantizedWeight> {
        let mut out = [std::ptr::null_mut(); 3];
        check(unsafe { ffi::mlxs_quantize(w.raw(), group_size as c_int, bits as c_int, out.as_mut_ptr()) })?;
        let [w, scales, biases] = out.map(|p| Array::wrap(p).expect("quantize returned three arrays"));
        Ok(QuantizedWeight { w, scales, biases, group_size, bits })
    }

    /// x @ W^T.
    pub fn matmul(&self, x: &Array) -> Result<Array> {
        Array::wrap(unsafe {
            ffi::mlxs_quantized_matmul(x.raw(), self.w.raw(), self.scales.raw(), self.biases.raw(), 1, self.group_size as c_int, self.bits as c_int)
        })
    }
}

/// MLX's fused RMSNorm over the last axis.
pub fn rms_norm(x: &Array, weight: Option<&Array>, eps: f32) -> Result<Array> {
    Array::wrap(unsafe { ffi::mlxs_rms_norm(x.raw(), weight.map_or(std::ptr::null(), Array::raw), eps) })
}

/// MLX's fused rotary embedding of x (..., seq, head_dim) at positions
/// `offset..offset + seq`: adjacent pairs when `traditional`, else halves.
pub fn rope(x: &Array, dims: usize, traditional: bool, base: f32, scale: f32, offset: usize) -> Result<Array> {
    Array::wrap(unsafe { ffi::mlxs_rope(x.raw(), dims as c_int, traditional as c_int, base, scale, offset as c_int) })
}

/// MLX's fused attention over (batch, heads, seq, head_dim); keys and values
/// may have fewer heads (grouped-query attention).
pub fn scaled_dot_product_attention(q: &Array, k: &Array, v: &Array, scale: f32, causal: bool) -> Result<Array> {
    let mask = CString::new(if causal { "causal" } else { "" }).unwrap();
    Array::wrap(unsafe { ffi::mlxs_sdpa(q.raw(), k.raw(), v.raw(), scale, mask.as_ptr()) })
}
