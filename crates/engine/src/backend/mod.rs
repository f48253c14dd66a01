//! Compute backends beside the `cpu` kernels (`cpu.rs`). The `mlx` backend
//! is being built up here one verified piece at a time (see
//! docs/mlx-backend.md); model code will reach it through the same fused
//! operations as the CPU kernels.

pub mod mlx;
