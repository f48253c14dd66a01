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
    #[error("MLX is not available: {0}. The mlx backend needs an addon built against libmlx: in a checkout of mlx-serving, `npm run setup` fetches it (scripts/fetch-mlx.sh; MLX_DIR names another MLX wheel's mlx folder) and builds; the published package's addon runs the cpu backend")]
    Unavailable(String),
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

/// The shim's entry points, resolved once from its shared library.
macro_rules! shim_api {
    ($($name:ident($($arg:ty),*) -> $ret:ty;)*) => {
        #[allow(non_snake_case)]
        struct Api {
            $($name: unsafe extern "C" fn($($arg),*) -> $ret,)*
            _lib: libloading::Library,
        }

        impl Api {
            unsafe fn load(lib: libloading::Library) -> std::result::Result<Api, libloading::Error> {
                Ok(Api {
                    $($name: *lib.get(concat!(stringify!($name), "\0").as_bytes())?,)*
                    _lib: lib,
                })
            }
        }
    };
}

shim_api! {
    mlxs_last_error() -> *const c_char;
    mlxs_version() -> *const c_char;
    mlxs_has_gpu() -> c_int;
    mlxs_active_memory() -> usize;
    mlxs_free(*mut RawArray) -> ();
    mlxs_from_data(*const u8, c_int, *const i32, usize) -> *mut RawArray;
    mlxs_dtype(*const RawArray) -> c_int;
    mlxs_shape(*const RawArray, *mut i32, usize) -> usize;
    mlxs_eval(*const *mut RawArray, usize) -> c_int;
    mlxs_async_eval(*const *mut RawArray, usize) -> c_int;
    mlxs_read(*const RawArray, c_int, *mut u8, usize) -> c_int;
    mlxs_astype(*const RawArray, c_int) -> *mut RawArray;
    mlxs_reshape(*const RawArray, *const i32, usize) -> *mut RawArray;
    mlxs_transpose(*const RawArray, *const i32, usize) -> *mut RawArray;
    mlxs_slice(*const RawArray, *const i32, *const i32, usize) -> *mut RawArray;
    mlxs_slice_update(*const RawArray, *const RawArray, *const i32, *const i32, usize) -> *mut RawArray;
    mlxs_concatenate(*const *mut RawArray, usize, c_int) -> *mut RawArray;
    mlxs_take(*const RawArray, *const RawArray, c_int) -> *mut RawArray;
    mlxs_add(*const RawArray, *const RawArray) -> *mut RawArray;
    mlxs_multiply(*const RawArray, *const RawArray) -> *mut RawArray;
    mlxs_subtract(*const RawArray, *const RawArray) -> *mut RawArray;
    mlxs_silu(*const RawArray) -> *mut RawArray;
    mlxs_gelu_tanh(*const RawArray) -> *mut RawArray;
    mlxs_tanh(*const RawArray) -> *mut RawArray;
    mlxs_softmax(*const RawArray) -> *mut RawArray;
    mlxs_zeros(*const i32, usize, c_int) -> *mut RawArray;
    mlxs_scatter_rows(*const RawArray, *const RawArray, *const RawArray) -> *mut RawArray;
    mlxs_dequantize(*const RawArray, *const RawArray, *const RawArray, c_int, c_int) -> *mut RawArray;
    mlxs_matmul(*const RawArray, *const RawArray) -> *mut RawArray;
    mlxs_quantized_matmul(*const RawArray, *const RawArray, *const RawArray, *const RawArray, c_int, c_int, c_int) -> *mut RawArray;
    mlxs_quantize(*const RawArray, c_int, c_int, *mut *mut RawArray) -> c_int;
    mlxs_rms_norm(*const RawArray, *const RawArray, f32) -> *mut RawArray;
    mlxs_rope(*const RawArray, c_int, c_int, f32, f32, c_int) -> *mut RawArray;
    mlxs_rope_at(*const RawArray, c_int, *const RawArray, *const RawArray) -> *mut RawArray;
    mlxs_sdpa(*const RawArray, *const RawArray, *const RawArray, f32, *const c_char) -> *mut RawArray;
    mlxs_sdpa_masked(*const RawArray, *const RawArray, *const RawArray, f32, *const RawArray) -> *mut RawArray;
}

static API: std::sync::OnceLock<std::result::Result<Api, String>> = std::sync::OnceLock::new();

/// The shim, loaded on first use: `MLX_SHIM` names its file, else the one
/// this build compiled. `Err` says why MLX cannot be used here.
fn api() -> std::result::Result<&'static Api, &'static str> {
    API.get_or_init(|| {
        let path = std::env::var_os("MLX_SHIM")
            .or_else(|| option_env!("MLX_SHIM_PATH").map(Into::into))
            .ok_or_else(|| "built without MLX".to_string())?;
        // Loading runs libmlx's initialisers; the shim exports plain C functions.
        let lib = unsafe { libloading::Library::new(&path) }.map_err(|e| {
            // The loader's own message (which library is missing) is the error's source.
            let why = std::error::Error::source(&e).map_or(e.to_string(), |s| s.to_string());
            format!("cannot load {}: {why}", path.to_string_lossy())
        })?;
        unsafe { Api::load(lib) }.map_err(|e| format!("{}: {e}", path.to_string_lossy()))
    })
    .as_ref()
    .map_err(String::as_str)
}

/// The shim's entry points, or the error that makes every call fail.
fn ffi() -> Result<&'static Api> {
    api().map_err(|why| MlxError::Unavailable(why.to_string()))
}

/// Whether MLX can be used here (the shim and libmlx load).
pub fn available() -> bool {
    api().is_ok()
}

/// Why MLX cannot be used here, or `None` when it can.
pub fn unavailable_reason() -> Option<&'static str> {
    api().err()
}

/// MLX's version string ("0.32.4"), or `None` without MLX.
pub fn version() -> Option<String> {
    let f = ffi().ok()?;
    Some(unsafe { CStr::from_ptr((f.mlxs_version)()) }.to_string_lossy().into_owned())
}

/// Bytes MLX holds for live arrays (0 without MLX).
pub fn active_memory() -> usize {
    ffi().map_or(0, |f| unsafe { (f.mlxs_active_memory)() })
}

/// Whether MLX has a GPU here (Metal or CUDA).
pub fn has_gpu() -> bool {
    ffi().is_ok_and(|f| unsafe { (f.mlxs_has_gpu)() } == 1)
}

fn last_error(f: &Api) -> MlxError {
    MlxError::Mlx(unsafe { CStr::from_ptr((f.mlxs_last_error)()) }.to_string_lossy().into_owned())
}

/// The shim of an existing array (one exists only once the shim loaded).
fn loaded() -> &'static Api {
    api().expect("an MLX array exists, so the shim is loaded")
}

/// Calls a shim function returning a status.
fn check(call: impl FnOnce(&Api) -> c_int) -> Result<()> {
    let f = ffi()?;
    if call(f) == 0 {
        Ok(())
    } else {
        Err(last_error(f))
    }
}

/// Calls a shim function returning a new array.
fn new_array(call: impl FnOnce(&Api) -> *mut RawArray) -> Result<Array> {
    let f = ffi()?;
    NonNull::new(call(f)).map(Array).ok_or_else(|| last_error(f))
}

/// One MLX array (a node of MLX's lazy graph, or its evaluated data).
/// `Send`: MLX reference-counts arrays atomically; not `Sync`, since
/// evaluating one graph from two threads at once is not supported.
pub struct Array(NonNull<RawArray>);

unsafe impl Send for Array {}

impl Drop for Array {
    fn drop(&mut self) {
        // An array exists only if the shim loaded.
        if let Ok(f) = ffi() {
            unsafe { (f.mlxs_free)(self.0.as_ptr()) }
        }
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
    /// A copy of `data` with the given shape (row-major).
    pub fn from_slice<T: Element>(data: &[T], shape: &[usize]) -> Result<Array> {
        let n: usize = shape.iter().product();
        if n != data.len() {
            return Err(MlxError::Invalid(format!("shape {shape:?} holds {n} elements, data has {}", data.len())));
        }
        let shape = dims(shape)?;
        new_array(|f| unsafe { (f.mlxs_from_data)(data.as_ptr().cast(), T::DTYPE as c_int, shape.as_ptr(), shape.len()) })
    }

    /// Raw bytes of element type `dtype` (weights as a file stores them).
    pub fn from_bytes(bytes: &[u8], dtype: Dtype, shape: &[usize]) -> Result<Array> {
        let n: usize = shape.iter().product();
        if n * dtype.size() != bytes.len() {
            return Err(MlxError::Invalid(format!("shape {shape:?} of {dtype:?} needs {} bytes, got {}", n * dtype.size(), bytes.len())));
        }
        let shape = dims(shape)?;
        new_array(|f| unsafe { (f.mlxs_from_data)(bytes.as_ptr(), dtype as c_int, shape.as_ptr(), shape.len()) })
    }

    pub fn dtype(&self) -> Option<Dtype> {
        Dtype::from_code(unsafe { (loaded().mlxs_dtype)(self.0.as_ptr()) })
    }

    pub fn shape(&self) -> Vec<usize> {
        let mut out = [0i32; 8];
        let n = unsafe { (loaded().mlxs_shape)(self.0.as_ptr(), out.as_mut_ptr(), out.len()) };
        if n > out.len() {
            let mut v = vec![0i32; n];
            unsafe { (loaded().mlxs_shape)(self.0.as_ptr(), v.as_mut_ptr(), n) };
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
        check(|f| unsafe { (f.mlxs_read)(self.0.as_ptr(), T::DTYPE as c_int, v.as_mut_ptr().cast(), v.len()) })?;
        Ok(v)
    }

    pub fn to_vec_f32(&self) -> Result<Vec<f32>> {
        self.to_vec()
    }

    fn raw(&self) -> *const RawArray {
        self.0.as_ptr()
    }

    pub fn astype(&self, dtype: Dtype) -> Result<Array> {
        new_array(|f| unsafe { (f.mlxs_astype)(self.raw(), dtype as c_int) })
    }

    pub fn reshape(&self, shape: &[usize]) -> Result<Array> {
        let s = dims(shape)?;
        new_array(|f| unsafe { (f.mlxs_reshape)(self.raw(), s.as_ptr(), s.len()) })
    }

    pub fn transpose(&self, axes: &[usize]) -> Result<Array> {
        let a = dims(axes)?;
        new_array(|f| unsafe { (f.mlxs_transpose)(self.raw(), a.as_ptr(), a.len()) })
    }

    /// Elements `start[i]..stop[i]` along each axis.
    pub fn slice(&self, start: &[usize], stop: &[usize]) -> Result<Array> {
        if start.len() != stop.len() {
            return Err(MlxError::Invalid("slice: start and stop differ in length".into()));
        }
        let (a, b) = (dims(start)?, dims(stop)?);
        new_array(|f| unsafe { (f.mlxs_slice)(self.raw(), a.as_ptr(), b.as_ptr(), a.len()) })
    }

    /// This array with elements `start[i]..stop[i]` replaced by `update`
    /// (how a KV cache preallocated in MLX takes each step's keys).
    pub fn slice_update(&self, update: &Array, start: &[usize], stop: &[usize]) -> Result<Array> {
        if start.len() != stop.len() {
            return Err(MlxError::Invalid("slice_update: start and stop differ in length".into()));
        }
        let (a, b) = (dims(start)?, dims(stop)?);
        new_array(|f| unsafe { (f.mlxs_slice_update)(self.raw(), update.raw(), a.as_ptr(), b.as_ptr(), a.len()) })
    }

    /// Rows (along `axis`) picked by `indices` (an embedding lookup).
    pub fn take(&self, indices: &Array, axis: i32) -> Result<Array> {
        new_array(|f| unsafe { (f.mlxs_take)(self.raw(), indices.raw(), axis) })
    }

    pub fn add(&self, other: &Array) -> Result<Array> {
        new_array(|f| unsafe { (f.mlxs_add)(self.raw(), other.raw()) })
    }

    pub fn multiply(&self, other: &Array) -> Result<Array> {
        new_array(|f| unsafe { (f.mlxs_multiply)(self.raw(), other.raw()) })
    }

    pub fn subtract(&self, other: &Array) -> Result<Array> {
        new_array(|f| unsafe { (f.mlxs_subtract)(self.raw(), other.raw()) })
    }

    /// A float32 scalar, which broadcasts against any array.
    pub fn scalar(v: f32) -> Result<Array> {
        Array::from_slice(&[v], &[])
    }

    pub fn zeros(shape: &[usize], dtype: Dtype) -> Result<Array> {
        let s = dims(shape)?;
        new_array(|f| unsafe { (f.mlxs_zeros)(s.as_ptr(), s.len(), dtype as c_int) })
    }

    /// x * sigmoid(x)
    pub fn silu(&self) -> Result<Array> {
        new_array(|f| unsafe { (f.mlxs_silu)(self.raw()) })
    }

    /// GELU, tanh approximation.
    pub fn gelu_tanh(&self) -> Result<Array> {
        new_array(|f| unsafe { (f.mlxs_gelu_tanh)(self.raw()) })
    }

    pub fn tanh(&self) -> Result<Array> {
        new_array(|f| unsafe { (f.mlxs_tanh)(self.raw()) })
    }

    /// Softmax over the last axis (computed in float32).
    pub fn softmax(&self) -> Result<Array> {
        new_array(|f| unsafe { (f.mlxs_softmax)(self.raw()) })
    }

    /// This matrix `(rows, cols)` with rows `indices` (i32) replaced by
    /// `updates` `(indices.len(), cols)`, converted to this array's type
    /// (how the paged KV cache takes each step's keys).
    pub fn scatter_rows(&self, indices: &Array, updates: &Array) -> Result<Array> {
        new_array(|f| unsafe { (f.mlxs_scatter_rows)(self.raw(), indices.raw(), updates.raw()) })
    }

    pub fn matmul(&self, other: &Array) -> Result<Array> {
        new_array(|f| unsafe { (f.mlxs_matmul)(self.raw(), other.raw()) })
    }
}

/// Runs the graphs behind `arrays`.
pub fn eval(arrays: &[&Array]) -> Result<()> {
    let raw: Vec<*mut RawArray> = arrays.iter().map(|a| a.0.as_ptr()).collect();
    check(|f| unsafe { (f.mlxs_eval)(raw.as_ptr(), raw.len()) })
}

/// Starts running the graphs behind `arrays` and returns at once, so host
/// work overlaps the computation; a later `eval` or read waits for it.
pub fn async_eval(arrays: &[&Array]) -> Result<()> {
    let raw: Vec<*mut RawArray> = arrays.iter().map(|a| a.0.as_ptr()).collect();
    check(|f| unsafe { (f.mlxs_async_eval)(raw.as_ptr(), raw.len()) })
}

pub fn concatenate(arrays: &[&Array], axis: i32) -> Result<Array> {
    let raw: Vec<*mut RawArray> = arrays.iter().map(|a| a.0.as_ptr()).collect();
    new_array(|f| unsafe { (f.mlxs_concatenate)(raw.as_ptr(), raw.len(), axis) })
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
        check(|f| unsafe { (f.mlxs_quantize)(w.raw(), group_size as c_int, bits as c_int, out.as_mut_ptr()) })?;
        let [w, scales, biases] = out.map(|p| Array(NonNull::new(p).expect("quantize returned three arrays")));
        Ok(QuantizedWeight { w, scales, biases, group_size, bits })
    }

    /// The weights as floats, or only rows `rows` of them (an embedding lookup).
    pub fn dequantize(&self, rows: Option<&Array>) -> Result<Array> {
        let pick = |a: &Array| rows.map_or_else(|| a.reshape(&a.shape()), |r| a.take(r, 0));
        let (w, s, b) = (pick(&self.w)?, pick(&self.scales)?, pick(&self.biases)?);
        new_array(|f| unsafe { (f.mlxs_dequantize)(w.raw(), s.raw(), b.raw(), self.group_size as c_int, self.bits as c_int) })
    }

    /// x @ W^T.
    pub fn matmul(&self, x: &Array) -> Result<Array> {
        new_array(|f| unsafe { (f.mlxs_quantized_matmul)(x.raw(), self.w.raw(), self.scales.raw(), self.biases.raw(), 1, self.group_size as c_int, self.bits as c_int)
        })
    }
}

/// MLX's fused RMSNorm over the last axis.
pub fn rms_norm(x: &Array, weight: Option<&Array>, eps: f32) -> Result<Array> {
    new_array(|f| unsafe { (f.mlxs_rms_norm)(x.raw(), weight.map_or(std::ptr::null(), Array::raw), eps) })
}

/// MLX's fused rotary embedding of x (..., seq, head_dim) at positions
/// `offset..offset + seq`: adjacent pairs when `traditional`, else halves.
pub fn rope(x: &Array, dims: usize, traditional: bool, base: f32, scale: f32, offset: usize) -> Result<Array> {
    new_array(|f| unsafe { (f.mlxs_rope)(x.raw(), dims as c_int, traditional as c_int, base, scale, offset as c_int) })
}

/// MLX's fused rotary embedding of `n` tokens at their own positions:
/// `x` is `(n, heads, 1, head_dim)`, `positions` int32 `(n)`, and pair `j`
/// turns by `position / freqs[j]` (adjacent pairs when `traditional`).
pub fn rope_at(x: &Array, traditional: bool, positions: &Array, freqs: &Array) -> Result<Array> {
    new_array(|f| unsafe { (f.mlxs_rope_at)(x.raw(), traditional as c_int, positions.raw(), freqs.raw()) })
}

/// MLX's fused attention over (batch, heads, seq, head_dim); keys and values
/// may have fewer heads (grouped-query attention).
pub fn scaled_dot_product_attention(q: &Array, k: &Array, v: &Array, scale: f32, causal: bool) -> Result<Array> {
    let mask = CString::new(if causal { "causal" } else { "" }).unwrap();
    new_array(|f| unsafe { (f.mlxs_sdpa)(q.raw(), k.raw(), v.raw(), scale, mask.as_ptr()) })
}

/// MLX's fused attention with an additive `mask` broadcast against the
/// scores `(heads, queries, keys)` (`-inf` hides a key).
pub fn scaled_dot_product_attention_masked(q: &Array, k: &Array, v: &Array, scale: f32, mask: &Array) -> Result<Array> {
    new_array(|f| unsafe { (f.mlxs_sdpa_masked)(q.raw(), k.raw(), v.raw(), scale, mask.raw()) })
}
