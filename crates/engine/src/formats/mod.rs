//! Model files: the GGUF and safetensors readers, the quantized block
//! formats (GGUF's and MLX's affine), and GGUF-to-MLX conversion.

pub mod affine;
pub mod convert;
pub mod filebuf;
pub mod gguf;
pub mod quant;
pub mod safetensors;
