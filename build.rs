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
    println!("cargo:rerun-if-changed=csrc/dist.cpp");
    println!("cargo:rerun-if-changed=csrc/bn_relu.cpp");
    println!("cargo:rerun-if-changed=csrc/ffi_error.h");
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
    if lib.join("libgomp.so.1").exists() {
        println!("cargo:rustc-link-arg=-l:libgomp.so.1");
    } else {
        println!("cargo:rustc-link-lib=gomp");
    }
    let mut build = cc::Build::new();
    build
        .cpp(true)
        .file("csrc/shim.cpp")
        .file("csrc/dist.cpp")
        .file("csrc/bn_relu.cpp")
        .include(&include)
        .include(include.join("torch/csrc/api/include"))
        .flag("-std=c++17")
        // The fused batch norm recomputes its ReLU mask in the backward pass: the same
        // expression must round the same way in both passes, so no a·b+c contraction into FMA.
        .flag("-ffp-contract=off")
        // at::parallel_for is an inline `#pragma omp parallel` in the OpenMP build of libtorch:
        // without -fopenmp the fused batch norm would run on one thread. The pragmas call the
        // libgomp that libtorch itself loads (torch/lib/libgomp.so.1), linked below.
        .flag("-fopenmp")
        .flag("-D_GLIBCXX_USE_CXX11_ABI=1")
        .flag_if_supported("-Wno-unused-parameter")
        .flag_if_supported("-Wno-deprecated-declarations")
        .warnings(false);
    // NCCL process groups need the CUDA runtime and NCCL headers, which the CUDA torch wheel's
    // dependencies install beside it (plus nvidia-cuda-crt and -cccl, see scripts/setup.sh);
    // without them the binary supports Gloo only and says so when NCCL is asked for.
    let nvidia = torch.parent().map(|p| p.join("nvidia"));
    let cuda_inc = nvidia.as_ref().and_then(|n| {
        std::fs::read_dir(n)
            .ok()?
            .flatten()
            .map(|e| e.path().join("include"))
            .find(|p| {
                ["cuda_runtime_api.h", "crt/host_config.h", "nv/target"]
                    .iter()
                    .all(|h| p.join(h).exists())
            })
    });
    let nccl_inc = nvidia.as_ref().map(|n| n.join("nccl/include"));
    if let (Some(cuda), Some(nccl)) = (cuda_inc, nccl_inc.filter(|p| p.join("nccl.h").exists())) {
        if lib.join("libtorch_cuda.so").exists() {
            build
                .include(cuda)
                .include(nccl)
                .define("USE_C10D_NCCL", None)
                .define("USE_CUDA", None)
                .define("TRICKS_WITH_NCCL", None);
        }
    }
    build.compile("tricks_shim");
    println!("cargo:rustc-link-lib=torch_cpu");
    println!("cargo:rustc-link-lib=c10");
}
