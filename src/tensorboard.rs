//! TensorBoard event files (`<run>/tb/events.out.tfevents.*`): scalars only, written by hand in
//! the documented format, so that `tensorboard --logdir runs/` shows every run side by side.
//!
//! A file is a sequence of TFRecords (the length as a little-endian u64, the masked CRC-32C of
//! those 8 bytes, the data, the masked CRC-32C of the data), each an `Event` protobuf: the first
//! carries `file_version = "brain.Event:2"`, the others a `Summary` of `simple_value` scalars.
//! The fields used, by number: `Event {wall_time: double = 1, step: int64 = 2, file_version:
//! string = 3, summary: Summary = 5}`, `Summary {repeated Value value = 1}`, `Value {tag: string
//! = 1, simple_value: float = 2}`.

use anyhow::{Context, Result};
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

/// The folder of a run's event files, under its output folder.
pub const DIR: &str = "tb";

/// Tells apart the files that runs of one process (a study with `--jobs N`) open in one second.
static FILE_COUNTER: AtomicUsize = AtomicUsize::new(0);

/// TFRecord's checksum: CRC-32C, rotated right by 15 bits, plus a constant.
pub fn masked_crc32c(data: &[u8]) -> u32 {
    let crc = crc32c::crc32c(data);
    crc.rotate_right(15).wrapping_add(0xa282_ead8)
}

/// An event file being written. Events are buffered; [`EventWriter::flush`] (called at the end of
/// each epoch) puts them on disk, and so does dropping the writer.
pub struct EventWriter {
    path: PathBuf,
    out: BufWriter<File>,
}

impl EventWriter {
    /// Creates `dir` and a new event file in it
    /// (`events.out.tfevents.<unix seconds>.<hostname>.<pid>.<counter>`), starting with the file
    /// version event. A resumed run opens a new file beside the old ones: TensorBoard reads every
    /// file of the folder, in name order.
    pub fn create(dir: &Path) -> Result<EventWriter> {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        let secs = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let name = format!(
            "events.out.tfevents.{secs}.{}.{}.{}",
            hostname(),
            std::process::id(),
            FILE_COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        let path = dir.join(name);
        let file =
            File::create(&path).with_context(|| format!("cannot create {}", path.display()))?;
        let mut w = EventWriter {
            path,
            out: BufWriter::new(file),
        };
        let mut event = event_header(wall_time(), 0);
        put_bytes(&mut event, 3, b"brain.Event:2");
        w.record(&event)?;
        w.flush()?;
        Ok(w)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// One event at `step` holding these scalars (none: nothing is written).
    pub fn scalars<'a>(
        &mut self,
        step: u64,
        values: impl IntoIterator<Item = (&'a str, f32)>,
    ) -> Result<()> {
        let mut summary = Vec::new();
        for (tag, v) in values {
            let mut value = Vec::new();
            put_bytes(&mut value, 1, tag.as_bytes());
            put_key(&mut value, 2, 5);
            value.extend_from_slice(&v.to_le_bytes());
            put_bytes(&mut summary, 1, &value);
        }
        if summary.is_empty() {
            return Ok(());
        }
        let mut event = event_header(wall_time(), step);
        put_bytes(&mut event, 5, &summary);
        self.record(&event)
    }

    /// Writes the buffered events to the file.
    pub fn flush(&mut self) -> Result<()> {
        self.out
            .flush()
            .with_context(|| format!("cannot write {}", self.path.display()))
    }

    fn record(&mut self, data: &[u8]) -> Result<()> {
        let len = (data.len() as u64).to_le_bytes();
        let mut rec = Vec::with_capacity(data.len() + 16);
        rec.extend_from_slice(&len);
        rec.extend_from_slice(&masked_crc32c(&len).to_le_bytes());
        rec.extend_from_slice(data);
        rec.extend_from_slice(&masked_crc32c(data).to_le_bytes());
        self.out
            .write_all(&rec)
            .with_context(|| format!("cannot write {}", self.path.display()))
    }
}

/// A run's events, which must never stop its training: the first write that fails is reported
/// through `warn` and ends the logging; the training goes on.
pub struct RunEvents {
    writer: Option<EventWriter>,
}

impl RunEvents {
    /// No events (ranks other than 0, a run with nothing left to train).
    pub fn off() -> RunEvents {
        RunEvents { writer: None }
    }

    /// A new event file in `dir` (see [`EventWriter::create`]).
    pub fn create(dir: &Path) -> Result<RunEvents> {
        Ok(RunEvents {
            writer: Some(EventWriter::create(dir)?),
        })
    }

    pub fn is_on(&self) -> bool {
        self.writer.is_some()
    }

    /// One event at `step` (see [`EventWriter::scalars`]).
    pub fn scalars(&mut self, step: u64, values: &[(String, f32)], warn: &dyn Fn(&str)) {
        let written = self
            .writer
            .as_mut()
            .map(|w| w.scalars(step, values.iter().map(|(t, v)| (t.as_str(), *v))));
        self.stop_on_error(written, warn);
    }

    /// Puts the buffered events on disk.
    pub fn flush(&mut self, warn: &dyn Fn(&str)) {
        let flushed = self.writer.as_mut().map(EventWriter::flush);
        self.stop_on_error(flushed, warn);
    }

    fn stop_on_error(&mut self, result: Option<Result<()>>, warn: &dyn Fn(&str)) {
        if let Some(Err(e)) = result {
            warn(&format!("warning: TensorBoard logging stopped: {e:#}"));
            self.writer = None;
        }
    }
}

impl Drop for EventWriter {
    fn drop(&mut self) {
        let _ = self.out.flush();
    }
}

/// The numeric fields of a JSON object (a line of `metrics.jsonl`) as TensorBoard tags: `train_x`
/// becomes `train/x`, `val_x` becomes `val/x`, other names stay as they are; the fields named in
/// `skip` (the epoch, which is the step), nulls and non-numbers are left out.
pub fn scalars_of(object: &serde_json::Value, skip: &[&str]) -> Vec<(String, f32)> {
    let Some(map) = object.as_object() else {
        return Vec::new();
    };
    map.iter()
        .filter(|(k, _)| !skip.contains(&k.as_str()))
        .filter_map(|(k, v)| {
            let x = v.as_f64()?;
            let tag = match (k.strip_prefix("train_"), k.strip_prefix("val_")) {
                (Some(rest), _) => format!("train/{rest}"),
                (_, Some(rest)) => format!("val/{rest}"),
                _ => k.clone(),
            };
            Some((tag, x as f32))
        })
        .collect()
}

fn wall_time() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

fn hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: the buffer is valid for its length; gethostname writes at most that many bytes.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    let name = String::from_utf8_lossy(&buf[..end]).into_owned();
    if rc != 0 || name.is_empty() {
        "localhost".into()
    } else {
        name
    }
}

/// `Event.wall_time` (field 1, 64-bit) and `Event.step` (field 2, varint).
fn event_header(wall_time: f64, step: u64) -> Vec<u8> {
    let mut e = Vec::with_capacity(64);
    put_key(&mut e, 1, 1);
    e.extend_from_slice(&wall_time.to_le_bytes());
    if step != 0 {
        put_key(&mut e, 2, 0);
        put_varint(&mut e, step);
    }
    e
}

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// A field's key: its number and wire type (0 varint, 1 64-bit, 2 length-delimited, 5 32-bit).
fn put_key(out: &mut Vec<u8>, field: u32, wire_type: u8) {
    put_varint(out, ((field as u64) << 3) | wire_type as u64);
}

fn put_bytes(out: &mut Vec<u8>, field: u32, bytes: &[u8]) {
    put_key(out, field, 2);
    put_varint(out, bytes.len() as u64);
    out.extend_from_slice(bytes);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// CRC-32C's check value (of "123456789") is 0xE3069283; the masked value is TensorFlow's
    /// `masked_crc32c` of the same bytes (as tensorboard's own record writer computes it).
    #[test]
    fn masked_crc_matches_known_values() {
        assert_eq!(crc32c::crc32c(b"123456789"), 0xE306_9283);
        assert_eq!(masked_crc32c(b"123456789"), MASKED_CHECK);
    }

    const MASKED_CHECK: u32 = 0xC78A_B0E5;

    #[test]
    fn varints_and_scalar_tags() {
        let mut v = Vec::new();
        put_varint(&mut v, 300);
        assert_eq!(v, [0xAC, 0x02]);
        let line = serde_json::json!({"epoch": 2, "lr": 0.1, "train_loss": 1.5,
            "val_top1": null, "val_loss": 2.0, "stopped": true});
        let mut tags = scalars_of(&line, &["epoch"]);
        tags.sort_by(|a, b| a.0.cmp(&b.0));
        assert_eq!(
            tags,
            [
                ("lr".to_string(), 0.1f32),
                ("train/loss".to_string(), 1.5),
                ("val/loss".to_string(), 2.0)
            ]
        );
    }
}
