//! Links the prebuilt MLX on Linux: an rpath to the wheel's `libmlx.so`, and OpenBLAS
//! ahead of the wheel's reference BLAS (about 30x faster matmuls on CPU).

fn main() {
    println!("cargo:rerun-if-env-changed=DEP_MLX_LIB_DIR");
    println!("cargo:rerun-if-env-changed=MLXSERVER_NO_OPENBLAS");
    println!("cargo::rustc-check-cfg=cfg(mlxserver_openblas)");
    let target_os = std::env::var("CARGO_CFG_TARGET_OS").unwrap_or_default();
    if target_os != "linux" {
        return;
    }
    if let Ok(lib_dir) = std::env::var("DEP_MLX_LIB_DIR") {
        println!("cargo:rustc-link-arg=-Wl,-rpath,{lib_dir}");
    }
    if std::env::var_os("MLXSERVER_NO_OPENBLAS").is_none() {
        // libmlx resolves cblas_* through the global scope: a library the executable
        // itself needs is searched before libmlx's own bundled BLAS.
        println!("cargo:rustc-link-arg=-Wl,--no-as-needed");
        println!("cargo:rustc-link-arg=-lopenblas");
        println!("cargo:rustc-link-arg=-Wl,--as-needed");
        println!("cargo:rustc-cfg=mlxserver_openblas");
    }
}
