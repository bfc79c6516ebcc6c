//! `metrics.jsonl`: one JSON object per epoch, appended as training goes, read back by reports.

use crate::checkpoint;
use anyhow::{Context, Result};
use serde::{de::DeserializeOwned, Serialize};
use std::io::Write;
use std::path::Path;

/// A per-epoch record that knows its epoch number.
pub trait EpochRecord: Serialize + DeserializeOwned {
    fn epoch(&self) -> usize;
}

/// Appends one line and flushes it to disk.
pub fn append<T: Serialize>(path: &Path, record: &T) -> Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .with_context(|| format!("cannot open {}", path.display()))?;
    writeln!(f, "{}", serde_json::to_string(record)?)
        .with_context(|| format!("cannot write {}", path.display()))?;
    f.sync_data().ok();
    Ok(())
}

/// Reads every line; an unreadable line is an error naming the file and the line.
pub fn read<T: DeserializeOwned>(path: &Path) -> Result<Vec<T>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .enumerate()
        .map(|(i, l)| {
            serde_json::from_str(l).with_context(|| format!("{}: line {}", path.display(), i + 1))
        })
        .collect()
}

/// Keeps only the epochs a checkpoint covers (a kill between the metrics line and the checkpoint
/// must not leave a duplicate epoch behind when the run resumes).
pub fn truncate<T: EpochRecord>(path: &Path, epochs_done: usize) -> Result<()> {
    if !path.exists() {
        return Ok(());
    }
    let mut text = String::new();
    for m in read::<T>(path)?
        .into_iter()
        .filter(|m| m.epoch() <= epochs_done)
    {
        text.push_str(&serde_json::to_string(&m)?);
        text.push('\n');
    }
    checkpoint::write_atomic(path, text.as_bytes())
}
