//! Finds libmlx and its headers (the `mlx` folder of an MLX wheel: `MLX_DIR`,
//! else `.mlx/mlx` at the workspace root, where `scripts/fetch-mlx.sh` puts
//! it), compiles the shim against them and links libmlx. Without MLX the
//! crate still builds: every call then fails with `MlxError::Unavailable`.

use std::path::PathBuf;

fn main() {
    println!("cargo:rerun-if-env-changed=MLX_DIR");
    println!("cargo:rerun-if-changed=shim/shim.cpp");
    println!("cargo:rerun-if-changed=shim/shim.h");
    println!("cargo::rustc-check-cfg=cfg(mlx)");
    let manifest = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap());
    let default = manifest.join("../../.mlx/mlx");
    println!("cargo:rerun-if-changed={}", default.display());
    let dir = std::env::var_os("MLX_DIR").map(PathBuf::from).unwrap_or(default);
    let lib = ["libmlx.so", "libmlx.dylib"].iter().map(|f| dir.join("lib").join(f)).find(|p| p.exists());
    let (Some(lib), true) = (lib, dir.join("include/mlx/mlx.h").exists()) else {
        println!(
            "cargo:warning=MLX not found at {} (run scripts/fetch-mlx.sh or set MLX_DIR): the mlx backend is not built",
            dir.display()
        );
        return;
    };
    let dir = dir.canonicalize().unwrap();
    let lib_dir = lib.parent().unwrap().canonicalize().unwrap();
    cc::Build::new()
        .cpp(true)
        .std("c++20")
        .file("shim/shim.cpp")
        .include(dir.join("include"))
        .opt_level(2)
        // MLX's headers trip -Wall in ways that are not ours to fix.
        .warnings(false)
        .compile("mlx_shim");
    println!("cargo:rustc-link-search=native={}", lib_dir.display());
    println!("cargo:rustc-link-lib=dylib=mlx");
    // This crate's own tests find libmlx through an rpath; crates linking it
    // into a binary read the folder from DEP_MLX_LIB_DIR.
    println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib_dir.display());
    println!("cargo:lib_dir={}", lib_dir.display());
    println!("cargo:rustc-cfg=mlx");
}
