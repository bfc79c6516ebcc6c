//! Links the binary to the libtorch of the project's Python environment so that it runs
//! without LD_LIBRARY_PATH, keeps libtorch_cuda linked (rustc's default `--as-needed`
//! would drop it and CUDA would never be available), and compiles the C++ shim in csrc/.
use std::path::PathBuf;
use std::process::Command;

fn torch_dir() -> PathBuf {
    if let Ok(dir) = std::env::var("LIBTORCH") {
        return PathBuf::from(dir);
    }
    let python = std::env::var("PYTHON").unwrap_or_else(|_| "python3".to_string());
    let out = Command::new(&python)
        .args([
            "-c",
            "import os, torch; print(os.path.dirname(torch.__file__))",
        ])
        .output()
        .unwrap_or_else(|e| panic!("cannot run {python} to find torch: {e}; run scripts/setup.sh"));
    if !out.status.success() {
        panic!(
            "{python} has no torch module: run scripts/setup.sh (it installs torch==2.11.0 into .venv)\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    PathBuf::from(String::from_utf8(out.stdout).unwrap().trim())
}

fn main() {
    println!("cargo:rerun-if-changed=csrc/shim.cpp");
    println!("cargo:rerun-if-env-changed=LIBTORCH");
    println!("cargo:rerun-if-env-changed=PYTHON");
    let torch = torch_dir();
    let lib = torch.join("lib");
    let include = torch.join("include");
    println!("cargo:rustc-link-search=native={}", lib.display());
    println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib.display());
    if lib.join("libtorch_cuda.so").exists() {
        println!(
            "cargo:rustc-link-arg=-Wl,--push-state,--no-as-needed,-ltorch_cuda,-ltorch,--pop-state"
        );
    }
    cc::Build::new()
        .cpp(true)
        .file("csrc/shim.cpp")
        .include(&include)
        .include(include.join("torch/csrc/api/include"))
        .flag("-std=c++17")
        .flag("-D_GLIBCXX_USE_CXX11_ABI=1")
        .flag_if_supported("-Wno-unused-parameter")
        .flag_if_supported("-Wno-deprecated-declarations")
        .warnings(false)
        .compile("tricks_shim");
    println!("cargo:rustc-link-lib=torch_cpu");
    println!("cargo:rustc-link-lib=c10");
}
