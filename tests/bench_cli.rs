//! `tricks bench --lockstep`, the protocol bench/lockstep.py drives: `ready` after the warm-up,
//! then one step and one time per command line.

mod common;

use common::*;
use std::io::Write;
use std::process::{Output, Stdio};

fn lockstep(commands: &str) -> Output {
    let mut child = tricks()
        .args(["bench", "--model", "cifar_resnet20", "--batch", "4"])
        .args(["--warmup", "1", "--threads", "1", "--lockstep"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Dropping stdin at the end of this statement is the end of input.
    child
        .stdin
        .take()
        .unwrap()
        .write_all(commands.as_bytes())
        .unwrap();
    child.wait_with_output().unwrap()
}

#[test]
fn lockstep_takes_one_step_per_command_and_prints_its_time() {
    let o = lockstep("train\ninfer\n  train \n");
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 5, "{out}");
    assert_eq!(lines[0], "ready");
    for line in &lines[1..4] {
        let ms: f64 = line
            .parse()
            .unwrap_or_else(|_| panic!("{line:?} is not a time"));
        assert!(ms > 0.0 && ms < 60_000.0, "{ms}");
    }
    let summary: serde_json::Value = serde_json::from_str(lines[4]).unwrap();
    assert_eq!(summary["lockstep"], true);
}

#[test]
fn lockstep_refuses_an_unknown_command() {
    let o = lockstep("train\nwalk\n");
    assert_eq!(o.status.code(), Some(1));
    assert!(stdout(&o).starts_with("ready\n"));
    assert!(
        stderr(&o).contains("lockstep: unknown command \"walk\" (train or infer)"),
        "{}",
        stderr(&o)
    );
}

/// `--threads 0` on a CPU follows the cores other processes leave free (device::IntraOpThreads):
/// beside busy loops on all but one of the cores this process may use, the warm-up ends with
/// fewer threads than cores, and the change is logged.
#[test]
fn threads_zero_gives_up_the_cores_other_processes_keep_busy() {
    let cores = num_cpus::get();
    if cores < 2 {
        eprintln!("one core: nothing to give up, skipped");
        return;
    }
    let busy: Vec<_> = (0..cores - 1)
        .map(|_| {
            std::process::Command::new("sh")
                .args(["-c", "while :; do :; done"])
                .spawn()
                .unwrap()
        })
        .collect();
    let o = tricks()
        .args(["bench", "--model", "cifar_resnet20", "--batch", "32"])
        .args(["--warmup", "1", "--steps", "2", "--threads", "0"])
        .output()
        .unwrap();
    for mut b in busy {
        b.kill().unwrap();
        b.wait().unwrap();
    }
    assert!(o.status.success(), "{}", stderr(&o));
    let line = stdout(&o);
    let summary: serde_json::Value = serde_json::from_str(line.trim()).unwrap();
    let used = summary["threads"].as_u64().unwrap() as usize;
    assert!(used < cores, "{used} threads of {cores} cores: {line}");
    let log = stderr(&o);
    assert!(
        log.contains(&format!("intra-op threads {cores} -> ")),
        "{log}"
    );
    assert!(
        log.contains(&format!(" -> {used}: other processes keep ")),
        "{log}"
    );
}
