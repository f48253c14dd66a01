//! Finds libmlx and its headers (the `mlx` folder of an MLX wheel: `MLX_DIR`,
//! else `.mlx/mlx` at the workspace root, where `scripts/fetch-mlx.sh` puts
//! it) and compiles the shim against them into its own shared library, with
//! an rpath to libmlx. The crate loads that library at run time, so nothing
//! that links this crate needs libmlx to start: without it (or without MLX
//! at build time) every call fails with `MlxError::Unavailable`.

use std::path::PathBuf;
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-env-changed=MLX_DIR");
    println!("cargo:rerun-if-changed=shim/shim.cpp");
    println!("cargo:rerun-if-changed=shim/shim.h");
    let manifest = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap());
    let default = manifest.join("../../.mlx/mlx");
    println!("cargo:rerun-if-changed={}", default.display());
    let dir = std::env::var_os("MLX_DIR").map(PathBuf::from).unwrap_or(default);
    let macos = std::env::var("CARGO_CFG_TARGET_OS").as_deref() == Ok("macos");
    let lib_name = if macos { "libmlx.dylib" } else { "libmlx.so" };
    if !dir.join("lib").join(lib_name).exists() || !dir.join("include/mlx/mlx.h").exists() {
        println!(
            "cargo:warning=MLX not found at {} (run scripts/fetch-mlx.sh or set MLX_DIR): the mlx backend is not built",
            dir.display()
        );
        return;
    }
    let dir = dir.canonicalize().unwrap();
    let lib_dir = dir.join("lib");
    let out = PathBuf::from(std::env::var("OUT_DIR").unwrap()).join(if macos { "libmlx_shim.dylib" } else { "libmlx_shim.so" });
    let compiler = cc::Build::new().cpp(true).get_compiler();
    let mut cmd: Command = compiler.to_command();
    cmd.arg("-std=c++20")
        .arg("-O2")
        .arg("-fPIC")
        .arg(if macos { "-dynamiclib" } else { "-shared" })
        .arg("-o")
        .arg(&out)
        .arg(manifest.join("shim/shim.cpp"))
        .arg("-I")
        .arg(dir.join("include"))
        .arg("-L")
        .arg(&lib_dir)
        .arg("-lmlx")
        .arg(format!("-Wl,-rpath,{}", lib_dir.display()));
    let status = cmd.status().expect("cannot run the C++ compiler");
    assert!(status.success(), "compiling shim/shim.cpp failed: {cmd:?}");
    println!("cargo:rustc-env=MLX_SHIM_PATH={}", out.display());
}
