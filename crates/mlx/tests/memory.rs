//! Its own test binary: MLX's memory counter is process-wide, so no other
//! test may allocate while this one measures.

use mlx_serving_mlx::*;

/// Dropped arrays give their memory back: a thousand steps of a small
/// graph leave MLX holding what it held before.
#[test]
fn dropped_arrays_free_their_memory() {
    if !available() {
        assert!(std::env::var_os("MLX_REQUIRED").is_none(), "MLX_REQUIRED is set but MLX is unavailable: {:?}", unavailable_reason());
        return;
    }
    let w = Array::from_slice(&vec![0.01f32; 256 * 256], &[256, 256]).unwrap();
    let x = Array::from_slice(&vec![0.5f32; 256], &[1, 256]).unwrap();
    eval(&[&w, &x]).unwrap();
    let before = active_memory();
    for _ in 0..1000 {
        let y = x.matmul(&w).unwrap().silu().unwrap();
        let z = rms_norm(&y, None, 1e-5).unwrap();
        assert_eq!(z.to_vec_f32().unwrap().len(), 256);
    }
    assert_eq!(active_memory(), before);
}
