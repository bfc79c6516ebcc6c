//! `tricks launch`: starts the local ranks of a data-parallel run, like torchrun. Each child is
//! this same binary with the torchrun environment set; the launcher forwards SIGINT/SIGTERM as
//! one SIGTERM per child (so they checkpoint and stop together), and when one rank fails it
//! stops the others and reports which rank failed first. A rank that exits 130 or 143 was
//! stopped by a signal after its checkpoint: that is not a failure.

use anyhow::{anyhow, bail, Context, Result};
use std::os::unix::process::CommandExt;
use std::os::unix::process::ExitStatusExt;
use std::process::{Child, Command, ExitStatus};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// What to launch.
#[derive(Debug, Clone)]
pub struct LaunchSpec {
    /// Processes on this machine.
    pub nproc: usize,
    /// Machines in the run, and this machine's index among them.
    pub nnodes: usize,
    pub node_rank: usize,
    /// Rendezvous address (rank 0's machine) and port; the port defaults to a free one when
    /// the run has a single machine.
    pub master_addr: String,
    pub master_port: Option<u16>,
    /// Arguments of `tricks` for every rank (e.g. `train --config ...`).
    pub args: Vec<String>,
    /// How long stopped ranks get to finish before they are killed.
    pub grace: Duration,
}

/// A TCP port that was free a moment ago on the loopback interface.
pub fn free_port() -> Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").context("cannot find a free TCP port")?;
    Ok(l.local_addr()?.port())
}

fn describe(status: ExitStatus) -> String {
    match (status.code(), status.signal()) {
        (Some(c), _) => format!("exit status {c}"),
        (None, Some(s)) => format!("signal {s}"),
        _ => "an unknown status".into(),
    }
}

fn signal(child: &Child, sig: i32) {
    // SAFETY: kill(2) on a child we spawned and have not yet reaped.
    unsafe {
        libc::kill(child.id() as libc::pid_t, sig);
    }
}

/// The exit statuses of a rank that a signal stopped after its checkpoint (SIGINT, SIGTERM).
pub const STOPPED_CODES: [i32; 2] = [128 + libc::SIGINT, 128 + libc::SIGTERM];

/// Runs the ranks to completion. `stop` is set by the launcher's own signal handler. Returns
/// `None` when every rank finished, or the status of the first rank a signal stopped (130 or
/// 143); an error names the first rank that failed.
pub fn run(spec: &LaunchSpec, stop: Arc<AtomicBool>) -> Result<Option<i32>> {
    if spec.nproc == 0 || spec.nnodes == 0 || spec.node_rank >= spec.nnodes {
        bail!(
            "launch: need --nproc ≥ 1 and --node-rank below --nnodes (got nproc {}, nnodes {}, node rank {})",
            spec.nproc,
            spec.nnodes,
            spec.node_rank
        );
    }
    if spec.args.is_empty() {
        bail!("launch: give the command for every rank after `--`, e.g. `tricks launch --nproc 2 -- train --config FILE`");
    }
    let port = match spec.master_port {
        Some(p) => p,
        None if spec.nnodes == 1 => free_port()?,
        None => bail!(
            "launch: a run on several machines needs --master-port (the same on every machine)"
        ),
    };
    let exe = std::env::current_exe().context("cannot find the tricks binary to launch")?;
    let world = spec.nproc * spec.nnodes;
    let mut children: Vec<Option<Child>> = Vec::new();
    for local in 0..spec.nproc {
        let rank = spec.node_rank * spec.nproc + local;
        let mut cmd = Command::new(&exe);
        cmd.args(&spec.args)
            .env("RANK", rank.to_string())
            .env("WORLD_SIZE", world.to_string())
            .env("LOCAL_RANK", local.to_string())
            .env("LOCAL_WORLD_SIZE", spec.nproc.to_string())
            .env("GROUP_RANK", spec.node_rank.to_string())
            .env("MASTER_ADDR", &spec.master_addr)
            .env("MASTER_PORT", port.to_string())
            // The terminal's Ctrl-C goes to the launcher only, which sends each rank one SIGTERM
            // (a second signal would make a rank exit without its checkpoint).
            .process_group(0);
        // SAFETY: prctl is async-signal-safe; a rank gets SIGTERM when the launcher dies.
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
                Ok(())
            });
        }
        match cmd.spawn() {
            Ok(c) => children.push(Some(c)),
            Err(e) => {
                for c in children.iter().flatten() {
                    signal(c, libc::SIGTERM);
                }
                return Err(anyhow!(e)).context(format!("cannot start rank {rank}"));
            }
        }
    }
    eprintln!(
        "launch: {} rank(s) on this machine ({} in all), rendezvous at {}:{port}",
        spec.nproc, world, spec.master_addr
    );

    let mut first_failure: Option<(usize, ExitStatus)> = None;
    let mut stopped: Option<i32> = None;
    let mut stopping_since: Option<Instant> = None;
    let mut forwarded = false;
    loop {
        for (local, slot) in children.iter_mut().enumerate() {
            let Some(child) = slot else { continue };
            if let Some(status) = child.try_wait()? {
                *slot = None;
                let code = status.code();
                if code.is_some_and(|c| STOPPED_CODES.contains(&c)) {
                    stopped = stopped.or(code);
                } else if !status.success() && first_failure.is_none() {
                    first_failure = Some((spec.node_rank * spec.nproc + local, status));
                }
            }
        }
        if children.iter().all(Option::is_none) {
            break;
        }
        let stop_all = first_failure.is_some() || stop.load(Ordering::SeqCst);
        if stop_all && !forwarded {
            for c in children.iter().flatten() {
                signal(c, libc::SIGTERM);
            }
            forwarded = true;
            stopping_since = Some(Instant::now());
        }
        if stopping_since.is_some_and(|t| t.elapsed() > spec.grace) {
            for c in children.iter_mut().flatten() {
                let _ = c.kill();
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    match first_failure {
        Some((rank, status)) => bail!(
            "launch: rank {rank} failed ({}); the other ranks were stopped",
            describe(status)
        ),
        None => Ok(stopped),
    }
}
