//! Device selection and process-wide libtorch settings.

use anyhow::{bail, Result};
use tch::{nn, Device, Tensor};

/// Parses `cpu`, `cuda`, `cuda:N` or `auto` (CUDA when available, else CPU).
pub fn parse_device(spec: &str) -> Result<Device> {
    match spec {
        "cpu" => Ok(Device::Cpu),
        "auto" => Ok(Device::cuda_if_available()),
        "cuda" => cuda(0),
        s => match s
            .strip_prefix("cuda:")
            .and_then(|n| n.parse::<usize>().ok())
        {
            Some(n) => cuda(n),
            None => bail!("unknown device {spec:?}; expected cpu, cuda, cuda:N or auto"),
        },
    }
}

fn cuda(index: usize) -> Result<Device> {
    if !tch::Cuda::is_available() {
        bail!("CUDA was asked for but is not available (no GPU or driver visible to libtorch); use --device cpu or auto");
    }
    let count = tch::Cuda::device_count() as usize;
    if index >= count {
        bail!("CUDA device {index} asked for but only {count} are visible");
    }
    Ok(Device::Cuda(index))
}

/// The cores this process may use: all of them, shared evenly among the processes of a
/// data-parallel run on this machine (`LOCAL_WORLD_SIZE`, set by `tricks launch`), so that N
/// ranks do not each start a thread per core.
pub fn cores_per_process() -> usize {
    let local = std::env::var("LOCAL_WORLD_SIZE")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
        .filter(|&n| n > 0)
        .unwrap_or(1);
    (num_cpus::get() / local).max(1)
}

/// Sets libtorch's intra-op thread count (0 = [`cores_per_process`]) and, on a GPU, whether
/// cuDNN autotunes its convolution algorithms (`train.cudnn_benchmark`).
pub fn configure(threads: usize, device: Device, cudnn_benchmark: bool) {
    let n = if threads == 0 {
        cores_per_process()
    } else {
        threads
    };
    tch::set_num_threads(n as i32);
    keep_freed_memory();
    set_cudnn_benchmark(device, cudnn_benchmark);
}

/// cuDNN's autotuner on or off, for a GPU (a process-wide libtorch flag; nothing for a CPU).
fn set_cudnn_benchmark(device: Device, on: bool) {
    if device.is_cuda() {
        unsafe { crate::ffi::tricks_set_cudnn_benchmark(on) };
    }
}

/// Lets the process keep the memory libtorch frees for its next allocations instead of handing it
/// back to the kernel. With glibc's defaults, freed blocks above a moving threshold go back with
/// `munmap` and the heap top is trimmed, so every CPU training step page-faults its activations in
/// again: 0.9–2.6 s of kernel time per 100 CIFAR ResNet-20 steps on the 2-core VM (3–7 % of the CPU
/// time) against 0.3 s with these settings (BENCHMARKS.md). The cost is that the resident memory
/// stays at its peak, which a training process reaches anyway. Blocks above 32 MiB (glibc's
/// ceiling for this threshold) are still mapped per allocation. Settings the user made through
/// `GLIBC_TUNABLES` or `MALLOC_*_` variables win.
fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        static ONCE: std::sync::Once = std::sync::Once::new();
        ONCE.call_once(|| {
            let user_set = std::env::var("GLIBC_TUNABLES").is_ok_and(|t| t.contains("malloc"))
                || std::env::vars().any(|(k, _)| k.starts_with("MALLOC_") && k.ends_with('_'));
            if !user_set {
                // SAFETY: mallopt only changes glibc's allocation policy for later calls.
                unsafe {
                    libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
                    libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
                }
            }
        });
    }
}

/// A line for `tricks info`.
pub fn describe() -> Vec<(String, String)> {
    let cuda = tch::Cuda::is_available();
    vec![
        ("tricks".into(), env!("CARGO_PKG_VERSION").into()),
        ("libtorch".into(), libtorch_version()),
        ("threads".into(), tch::get_num_threads().to_string()),
        ("cpu cores".into(), num_cpus::get().to_string()),
        (
            "cuda".into(),
            if cuda {
                format!("yes, {} device(s)", tch::Cuda::device_count())
            } else {
                "no".into()
            },
        ),
        (
            "cudnn".into(),
            if tch::Cuda::cudnn_is_available() {
                "yes".into()
            } else {
                "no".into()
            },
        ),
        ("cpu bf16 autocast".into(), cpu_bf16_supported().to_string()),
    ]
}

/// Whether this CPU has native bf16 units (AVX-512-BF16 or AMX), which make CPU autocast pay off.
pub fn cpu_bf16_supported() -> bool {
    std::fs::read_to_string("/proc/cpuinfo")
        .map(|s| {
            s.lines()
                .filter(|l| l.starts_with("flags"))
                .any(|l| l.contains("avx512_bf16") || l.contains("amx_bf16"))
        })
        .unwrap_or(false)
}

/// The libtorch version of the headers the binary was built against.
fn libtorch_version() -> String {
    let (mut major, mut minor, mut patch) = (0, 0, 0);
    unsafe { crate::ffi::tricks_torch_version(&mut major, &mut minor, &mut patch) };
    format!("{major}.{minor}.{patch}")
}

/// tch has no memory-format API: permute to NHWC, make contiguous, permute back gives a
/// channels_last tensor with the NCHW shape.
pub fn to_channels_last(x: &Tensor) -> Tensor {
    x.permute([0, 2, 3, 1]).contiguous().permute([0, 3, 1, 2])
}

pub fn weights_to_channels_last(vs: &nn::VarStore) {
    tch::no_grad(|| {
        for (_, mut v) in vs.variables() {
            if v.dim() == 4 {
                v.set_data(&to_channels_last(&v));
            }
        }
    });
}

/// Moves a batch to the device, in NHWC memory layout when `channels_last`.
pub fn to_device_input(x: &Tensor, device: Device, channels_last: bool) -> Tensor {
    let x = upload(x, device);
    if channels_last {
        to_channels_last(&x)
    } else {
        x
    }
}

/// Copies a CPU tensor to `device` without making the host wait for the GPU's queue to drain (a
/// blocking copy synchronises the stream: one stall per batch). Safe for any source: from
/// page-locked memory the copy is asynchronous and libtorch's host allocator keeps the block
/// until it is done; from pageable memory CUDA stages the bytes before returning. On a CPU this
/// is a plain (no-op) move.
pub fn upload(t: &Tensor, device: Device) -> Tensor {
    t.to_device_(device, t.kind(), device.is_cuda(), false)
}

/// An uninitialised `[sizes]` f32 CPU tensor in page-locked memory, so that [`upload`] of it runs
/// asynchronously beside the GPU's work. Needs a CUDA driver.
pub fn empty_pinned(sizes: &[i64]) -> Result<Tensor> {
    // SAFETY: `sizes` outlives the call; a non-null result is a fresh `at::Tensor*` whose
    // ownership passes to the returned Tensor.
    let ptr = unsafe { crate::ffi::tricks_empty_pinned_f32(sizes.as_ptr(), sizes.len() as i32) };
    if ptr.is_null() {
        let bytes: i64 = 4 * sizes.iter().product::<i64>();
        bail!(
            "cannot allocate {:.1} MB of page-locked host memory for a batch{} (set data.pin_memory = false)",
            bytes as f64 / 1e6,
            if tch::Cuda::is_available() {
                ""
            } else {
                ": it needs a CUDA driver"
            }
        );
    }
    Ok(unsafe { Tensor::from_ptr(ptr as *mut _) })
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Kind;

    #[test]
    fn upload_to_the_cpu_keeps_the_values() {
        let t = Tensor::from_slice(&[1.5f32, -2.0, 3.25]).view([3, 1]);
        let u = upload(&t, Device::Cpu);
        assert_eq!(u.device(), Device::Cpu);
        assert_eq!(u.kind(), Kind::Float);
        assert_eq!(u.size(), [3, 1]);
        assert_eq!(
            Vec::<f32>::try_from(u.flatten(0, -1)).unwrap(),
            [1.5, -2.0, 3.25]
        );
    }

    /// `train.cudnn_benchmark` reaches libtorch's global flag (settable without a GPU). Not
    /// through `configure`: its thread count is process-wide, and other tests run meanwhile.
    #[test]
    fn configure_sets_cudnn_autotuning_for_a_gpu_as_asked() {
        for on in [false, true] {
            set_cudnn_benchmark(Device::Cuda(0), on);
            assert_eq!(unsafe { crate::ffi::tricks_cudnn_benchmark() }, on);
        }
    }

    #[test]
    fn pinned_batches_have_the_shape_or_a_clear_error() {
        match empty_pinned(&[2, 3, 4, 4]) {
            Ok(t) => {
                assert!(tch::Cuda::is_available());
                assert_eq!(t.size(), [2, 3, 4, 4]);
                assert_eq!(t.kind(), Kind::Float);
                assert_eq!(t.device(), Device::Cpu);
            }
            Err(e) => {
                // Without a CUDA driver libtorch has no page-locked memory to give.
                assert!(!tch::Cuda::is_available());
                let e = e.to_string();
                assert!(e.contains("page-locked"), "{e}");
                assert!(e.contains("CUDA driver"), "{e}");
                assert!(e.contains("data.pin_memory = false"), "{e}");
            }
        }
    }
}
