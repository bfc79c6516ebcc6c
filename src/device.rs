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

/// Sets libtorch's intra-op thread count (0 = [`cores_per_process`], adapted while training by
/// the returned [`IntraOpThreads`]) and, on a GPU, whether cuDNN autotunes its convolution
/// algorithms (`train.cudnn_benchmark`).
pub fn configure(threads: usize, device: Device, cudnn_benchmark: bool) -> IntraOpThreads {
    let n = if threads == 0 {
        cores_per_process()
    } else {
        threads
    };
    tch::set_num_threads(n as i32);
    keep_freed_memory();
    set_cudnn_benchmark(device, cudnn_benchmark);
    if threads == 0 && device == Device::Cpu && n > 1 {
        IntraOpThreads::adaptive(n)
    } else {
        IntraOpThreads::Fixed
    }
}

/// libtorch's intra-op thread count while a CPU run trains: fixed when the user set
/// `train.threads` (or `--threads`), otherwise one per core this process may use, fewer while
/// other processes keep some of those cores busy.
///
/// Why: libtorch's OpenMP workers (the libgomp PyTorch ships) busy-wait up to 300,000 iterations
/// at every barrier. When another process runs on one of the cores, the worker that shares it
/// runs a fraction of the time while the others spin waiting for it, and every operator waits for
/// the slowest: on the 2-core VM, a CIFAR ResNet-20 trains at 172 img/s on 2 threads beside one
/// busy process against 280 on 1 thread (PyTorch: 138 and 250; BENCHMARKS.md, "Sharing the CPU").
/// Sleeping workers (`OMP_WAIT_POLICY=PASSIVE`) recover most of it (263), but libgomp reads that
/// variable once, when it is loaded, before `main`, so only a re-executed process could set it;
/// and on more cores the busy core still holds up every operator. So the count follows the
/// cores left free: every [`IntraOpThreads::adapt`] call (once per training step) looks, at most
/// once per [`WINDOW`], at how much CPU time the cores this process may use spent on other
/// processes (`/proc/stat` per CPU minus this process's own time from `/proc/self/stat`), and
/// after two windows that agree sets the thread count to the cores left (rounded, at least 1,
/// at most the process's share).
pub enum IntraOpThreads {
    Fixed,
    Adaptive(std::sync::Mutex<Governor>),
}

/// How often [`IntraOpThreads::adapt`] measures the other processes' CPU time.
pub const WINDOW: std::time::Duration = std::time::Duration::from_secs(2);

impl IntraOpThreads {
    fn adaptive(share: usize) -> IntraOpThreads {
        match Governor::new(share) {
            Some(g) => IntraOpThreads::Adaptive(std::sync::Mutex::new(g)),
            None => IntraOpThreads::Fixed,
        }
    }

    /// Re-measures when a window has passed and changes the thread count if two windows in a
    /// row ask for the same new count. Returns a message for the log when it changed it. Call it
    /// from the thread that runs the steps (OpenMP's thread count is that thread's setting).
    pub fn adapt(&self) -> Option<String> {
        match self {
            IntraOpThreads::Fixed => None,
            IntraOpThreads::Adaptive(g) => g.lock().ok()?.adapt(),
        }
    }

    /// How many windows the count has been measured over (`usize::MAX` when it is fixed).
    pub fn windows_measured(&self) -> usize {
        match self {
            IntraOpThreads::Fixed => usize::MAX,
            IntraOpThreads::Adaptive(g) => g.lock().map_or(usize::MAX, |g| g.windows),
        }
    }
}

/// The state of [`IntraOpThreads::Adaptive`].
pub struct Governor {
    /// The most threads (the process's share of the cores).
    share: usize,
    /// The CPUs this process may run on (its affinity mask).
    cpus: Vec<usize>,
    current: usize,
    /// The count the last window asked for, when it differed from `current`.
    proposed: Option<usize>,
    last: CpuTimes,
    at: std::time::Instant,
    windows: usize,
}

/// Clock ticks: the busy time of the allowed CPUs, and this process's own CPU time.
#[derive(Clone, Copy)]
struct CpuTimes {
    busy: u64,
    own: u64,
}

impl Governor {
    fn new(share: usize) -> Option<Governor> {
        let cpus = allowed_cpus()?;
        let last = cpu_times(&cpus)?;
        Some(Governor {
            share,
            cpus,
            current: share,
            proposed: None,
            last,
            at: std::time::Instant::now(),
            windows: 0,
        })
    }

    fn adapt(&mut self) -> Option<String> {
        if self.at.elapsed() < WINDOW {
            return None;
        }
        let now = cpu_times(&self.cpus)?;
        let ticks = self.at.elapsed().as_secs_f64() * clock_ticks_per_second();
        self.at = std::time::Instant::now();
        let others = others_busy_cores(self.last, now, ticks);
        self.last = now;
        self.windows += 1;
        let wanted = threads_for(self.cpus.len(), others, self.share);
        if wanted == self.current {
            self.proposed = None;
            return None;
        }
        if self.proposed != Some(wanted) {
            self.proposed = Some(wanted);
            return None;
        }
        let before = std::mem::replace(&mut self.current, wanted);
        self.proposed = None;
        tch::set_num_threads(wanted as i32);
        Some(format!(
            "intra-op threads {before} -> {wanted}: other processes keep {others:.1} of the {} cores this process may use busy (train.threads = 0 follows them; set it to fix the count)",
            self.cpus.len()
        ))
    }
}

/// The cores other processes kept busy between two readings `ticks` clock ticks apart.
fn others_busy_cores(before: CpuTimes, after: CpuTimes, ticks: f64) -> f64 {
    let busy = after.busy.saturating_sub(before.busy) as f64;
    let own = after.own.saturating_sub(before.own) as f64;
    ((busy - own) / ticks.max(1.0)).max(0.0)
}

/// The thread count for `cpus` allowed cores of which `others` are busy with other processes:
/// the cores left, between 1 and `share`, where a core counts as taken once other processes use
/// more than [`TAKEN`] of it. Not half: while this process's threads run on every core, the
/// kernel's fair share leaves a competing process only part of one (2/3 beside two training
/// threads, 1/2 beside those and a loader thread), so "half a core or more" would miss it.
pub fn threads_for(cpus: usize, others: f64, share: usize) -> usize {
    let taken = (others - TAKEN).ceil().max(0.0) as usize;
    cpus.saturating_sub(taken).clamp(1, share.max(1))
}

/// The share of a core other processes must use for it to count as taken ([`threads_for`]).
pub const TAKEN: f64 = 0.35;

fn clock_ticks_per_second() -> f64 {
    // SAFETY: sysconf only reads a system constant.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if hz > 0 {
        hz as f64
    } else {
        100.0
    }
}

/// The CPUs of this process's affinity mask (None where it cannot be read).
fn allowed_cpus() -> Option<Vec<usize>> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let list = status
        .lines()
        .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))?;
    parse_cpu_list(list.trim())
}

/// A kernel CPU list such as `0-3,8,10-11`.
pub fn parse_cpu_list(list: &str) -> Option<Vec<usize>> {
    let mut cpus = Vec::new();
    for part in list.split(',').filter(|p| !p.is_empty()) {
        match part.split_once('-') {
            Some((a, b)) => cpus.extend(a.trim().parse::<usize>().ok()?..=b.trim().parse().ok()?),
            None => cpus.push(part.trim().parse().ok()?),
        }
    }
    (!cpus.is_empty()).then_some(cpus)
}

fn cpu_times(cpus: &[usize]) -> Option<CpuTimes> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let own = std::fs::read_to_string("/proc/self/stat").ok()?;
    Some(CpuTimes {
        busy: busy_ticks(&stat, cpus)?,
        own: own_ticks(&own)?,
    })
}

/// The busy clock ticks (user, nice, system, irq, softirq: everything but idle, iowait and the
/// hypervisor's steal) of the listed CPUs in a `/proc/stat` text.
pub fn busy_ticks(stat: &str, cpus: &[usize]) -> Option<u64> {
    let mut total = 0;
    let mut found = 0;
    for line in stat.lines() {
        let Some(rest) = line.strip_prefix("cpu") else {
            continue;
        };
        let mut fields = rest.split_whitespace();
        let Some(Ok(cpu)) = fields.next().map(str::parse::<usize>) else {
            continue; // the all-CPU line
        };
        if !cpus.contains(&cpu) {
            continue;
        }
        let v: Vec<u64> = fields.take(7).map(|f| f.parse().unwrap_or(0)).collect();
        if v.len() < 7 {
            return None;
        }
        // user nice system idle iowait irq softirq
        total += v[0] + v[1] + v[2] + v[5] + v[6];
        found += 1;
    }
    (found > 0).then_some(total)
}

/// utime + stime (clock ticks, all threads) of a `/proc/<pid>/stat` text.
pub fn own_ticks(stat: &str) -> Option<u64> {
    // The command name (field 2) may hold spaces and parentheses: count fields after the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace();
    // Fields 3.. follow; utime and stime are fields 14 and 15.
    let utime: u64 = fields.nth(11)?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(utime + stime)
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
    fn cpu_lists_parse_as_the_kernel_writes_them() {
        assert_eq!(
            parse_cpu_list("0-3,8,10-11"),
            Some(vec![0, 1, 2, 3, 8, 10, 11])
        );
        assert_eq!(parse_cpu_list("5"), Some(vec![5]));
        assert_eq!(parse_cpu_list(""), None);
        assert_eq!(parse_cpu_list("0-x"), None);
    }

    #[test]
    fn busy_ticks_add_the_listed_cpus_without_idle_iowait_or_steal() {
        let stat = "cpu  100 1 50 900 7 3 2 11 0 0\n\
                    cpu0 10 1 5 90 7 3 2 11 0 0\n\
                    cpu1 20 0 10 80 0 0 0 0 0 0\n\
                    cpu2 40 0 0 60 0 0 0 0 0 0\n\
                    intr 12345\nctxt 99\n";
        assert_eq!(busy_ticks(stat, &[0]), Some(10 + 1 + 5 + 3 + 2));
        assert_eq!(busy_ticks(stat, &[0, 1]), Some(21 + 30));
        assert_eq!(busy_ticks(stat, &[1, 2]), Some(30 + 40));
        assert_eq!(busy_ticks(stat, &[7]), None);
    }

    #[test]
    fn own_ticks_are_utime_plus_stime_even_with_odd_command_names() {
        // pid (comm) state ppid pgrp session tty tpgid flags minflt cminflt majflt cmajflt utime stime
        let stat = "4242 (tr (ick) s) R 1 4242 4242 0 -1 4194304 100 0 0 0 1234 56 0 0 20 0 3 0";
        assert_eq!(own_ticks(stat), Some(1234 + 56));
        assert_eq!(own_ticks("garbage"), None);
        let real = std::fs::read_to_string("/proc/self/stat").unwrap();
        assert!(own_ticks(&real).is_some());
    }

    #[test]
    fn the_thread_count_leaves_the_cores_others_use() {
        // Quiet: every core; the process's share caps it.
        assert_eq!(threads_for(2, 0.05, 2), 2);
        assert_eq!(threads_for(16, 0.2, 8), 8);
        // A busy process beside two training threads gets 2/3 of a core, beside three 1/2.
        assert_eq!(threads_for(2, 0.67, 2), 1);
        assert_eq!(threads_for(2, 0.5, 2), 1);
        assert_eq!(threads_for(2, 1.0, 2), 1);
        // Never fewer than one.
        assert_eq!(threads_for(2, 2.0, 2), 1);
        assert_eq!(threads_for(4, 2.5, 4), 1);
        assert_eq!(threads_for(4, 1.3, 4), 3);
        assert_eq!(threads_for(4, 1.4, 4), 2);
        let t = |busy, own| CpuTimes { busy, own };
        // 400 ticks of two cores busy over a 200-tick window, 300 of them this process's.
        assert!((others_busy_cores(t(1000, 500), t(1400, 800), 200.0) - 0.5).abs() < 1e-12);
        assert_eq!(others_busy_cores(t(1000, 500), t(1100, 700), 200.0), 0.0);
    }

    #[test]
    fn a_fixed_count_never_adapts() {
        let threads = configure(1, Device::Cpu, false);
        assert!(matches!(threads, IntraOpThreads::Fixed));
        assert_eq!(threads.adapt(), None);
        assert_eq!(tch::get_num_threads(), 1);
    }

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
