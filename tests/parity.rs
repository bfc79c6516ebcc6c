//! Numerical parity of the Rust ResNets with timm / torchvision, and of airbench94's network with
//! its PyTorch definition.
//!
//! Runs `scripts/parity.py` (python from `TRICKS_PYTHON`, else `.venv/bin/python`) into a
//! temporary directory. For every model in its `manifest.json` it builds the Rust model from
//! `{tricks_model, variant, num_classes}`, loads the reference state_dict with
//! `checkpoint::load_weights`, runs an eval-mode forward on the stored `input` and requires
//!
//!     max |logits_rust - logits_ref| / max |logits_ref| < 1e-4.
//!
//! It also requires that every tensor of the reference state_dict (but `num_batches_tracked`)
//! is a variable of the Rust model, so that a layer the Rust model lacks cannot go unnoticed.
//!
//! Without python, torch, timm, torchvision or safetensors the test prints why and passes,
//! unless `TRICKS_REQUIRE_PARITY=1`, which turns the skip into a failure.
//! `TRICKS_PARITY_MODELS=resnet50d,resnet18` restricts the run to some manifest names.
//! Set up the python side with `scripts/setup.sh --with-timm`.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};
use tch::nn::ModuleT;
use tch::{Device, Kind, Tensor};

use tricks::checkpoint::load_weights;
use tricks::config::ModelConfig;
use tricks::model::Classifier;

const TOLERANCE: f64 = 1e-4;
/// `scripts/parity.py` exits with this code when a python package is missing.
const EXIT_MISSING_PACKAGE: i32 = 3;

#[derive(serde::Deserialize, Debug)]
struct Entry {
    name: String,
    tricks_model: String,
    variant: String,
    num_classes: i64,
    #[serde(default)]
    weights: Option<String>,
    #[serde(default)]
    io: Option<String>,
}

fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn parity_required() -> bool {
    std::env::var("TRICKS_REQUIRE_PARITY")
        .map(|v| v == "1")
        .unwrap_or(false)
}

/// Skip (print and return) or, with `TRICKS_REQUIRE_PARITY=1`, fail.
fn skip(why: &str) {
    if parity_required() {
        panic!("parity test cannot run and TRICKS_REQUIRE_PARITY=1: {why}");
    }
    let hint = if why.contains("setup.sh") {
        ""
    } else {
        "run scripts/setup.sh --with-timm; "
    };
    eprintln!("SKIP parity: {why} ({hint}TRICKS_REQUIRE_PARITY=1 makes this a failure)");
}

fn python() -> PathBuf {
    match std::env::var_os("TRICKS_PYTHON") {
        Some(p) if !p.is_empty() => PathBuf::from(p),
        _ => repo_root().join(".venv").join("bin").join("python"),
    }
}

/// Tensor names stored in a safetensors file, read from its header only.
fn safetensors_names(path: &Path) -> Result<BTreeSet<String>> {
    use std::io::Read;
    let mut f = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut len = [0u8; 8];
    f.read_exact(&mut len)?;
    let len = u64::from_le_bytes(len) as usize;
    let mut header = vec![0u8; len];
    f.read_exact(&mut header)?;
    let header: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(&header)
        .with_context(|| format!("parsing the safetensors header of {}", path.display()))?;
    Ok(header
        .into_iter()
        .map(|(k, _)| k)
        .filter(|k| k != "__metadata__")
        .collect())
}

/// Max abs difference relative to the reference's max |logit|, for one manifest entry.
fn check_entry(dir: &Path, e: &Entry) -> Result<f64> {
    let weights = dir.join(
        e.weights
            .clone()
            .unwrap_or_else(|| format!("{}.safetensors", e.name)),
    );
    let io = dir.join(
        e.io.clone()
            .unwrap_or_else(|| format!("{}.io.safetensors", e.name)),
    );

    let cfg = ModelConfig {
        name: e.tricks_model.clone(),
        variant: e.variant.clone(),
        num_classes: e.num_classes,
        zero_gamma: false,
        cifar_stem: false,
        whiten_bias_epochs: 0,
        drop_path: 0.0,
        drop_rate: 0.0,
    };
    let mut vs = tch::nn::VarStore::new(Device::Cpu);
    let model = Classifier::new(&vs.root(), &cfg, e.num_classes)
        .with_context(|| format!("Classifier::new({} variant {})", e.tricks_model, e.variant))?;
    load_weights(&mut vs, &weights)
        .with_context(|| format!("load_weights({})", weights.display()))?;

    // Every reference tensor must land in the Rust model.
    let ours: BTreeSet<String> = vs.variables().into_keys().collect();
    let theirs: BTreeSet<String> = safetensors_names(&weights)?
        .into_iter()
        .filter(|k| !k.ends_with("num_batches_tracked"))
        .collect();
    let unused: Vec<&String> = theirs.difference(&ours).collect();
    let missing: Vec<&String> = ours.difference(&theirs).collect();
    if !unused.is_empty() || !missing.is_empty() {
        bail!(
            "key mismatch: {} reference tensors not in the Rust model {:?}; {} Rust variables not in the reference {:?}",
            unused.len(),
            unused.iter().take(12).collect::<Vec<_>>(),
            missing.len(),
            missing.iter().take(12).collect::<Vec<_>>()
        );
    }

    let tensors =
        Tensor::read_safetensors(&io).with_context(|| format!("reading {}", io.display()))?;
    let get = |name: &str| -> Result<Tensor> {
        tensors
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, t)| t.shallow_clone())
            .with_context(|| format!("{} has no tensor `{name}`", io.display()))
    };
    let input = get("input")?.to_kind(Kind::Float);
    let reference = get("logits")?.to_kind(Kind::Float);

    let logits = tch::no_grad(|| model.forward_t(&input, false));
    if logits.size() != reference.size() {
        bail!(
            "logits shape {:?}, reference {:?}",
            logits.size(),
            reference.size()
        );
    }
    if logits.isfinite().all().int64_value(&[]) == 0 {
        bail!("non-finite logits");
    }
    let max_ref = reference.abs().max().double_value(&[]);
    let max_diff = (&logits - &reference).abs().max().double_value(&[]);
    Ok(max_diff / max_ref.max(1e-12))
}

#[test]
fn parity_with_timm_and_torchvision() {
    let root = repo_root();
    let py = python();
    if !py.exists() {
        skip(&format!("no python at {}", py.display()));
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cmd = Command::new(&py);
    cmd.arg(root.join("scripts").join("parity.py"))
        .arg(dir.path());
    if let Ok(models) = std::env::var("TRICKS_PARITY_MODELS") {
        if !models.is_empty() {
            cmd.arg("--models").arg(models);
        }
    }
    let out = match cmd.output() {
        Ok(o) => o,
        Err(err) => {
            skip(&format!("cannot run {}: {err}", py.display()));
            return;
        }
    };
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    if out.status.code() == Some(EXIT_MISSING_PACKAGE) {
        skip(stderr.trim());
        return;
    }
    assert!(
        out.status.success(),
        "scripts/parity.py failed ({}):\n{stdout}\n{stderr}",
        out.status
    );
    eprint!("{stdout}");

    let manifest =
        std::fs::read_to_string(dir.path().join("manifest.json")).expect("manifest.json");
    let entries: Vec<Entry> =
        serde_json::from_str(&manifest).expect("manifest.json: a list of models");
    assert!(!entries.is_empty(), "empty manifest");

    let mut failures = Vec::new();
    for e in &entries {
        match check_entry(dir.path(), e) {
            Ok(rel) if rel < TOLERANCE => {
                eprintln!(
                    "ok   {:18} {} variant {}: max rel err {rel:.2e}",
                    e.name, e.tricks_model, e.variant
                )
            }
            Ok(rel) => {
                eprintln!(
                    "FAIL {:18} {} variant {}: max rel err {rel:.2e}",
                    e.name, e.tricks_model, e.variant
                );
                failures.push(format!(
                    "{}: max rel err {rel:.3e} >= {TOLERANCE:e}",
                    e.name
                ));
            }
            Err(err) => {
                eprintln!(
                    "FAIL {:18} {} variant {}: {err:#}",
                    e.name, e.tricks_model, e.variant
                );
                failures.push(format!("{}: {err:#}", e.name));
            }
        }
    }
    assert!(
        failures.is_empty(),
        "parity failures:\n  {}",
        failures.join("\n  ")
    );
}
