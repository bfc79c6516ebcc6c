//! The background producer the loaders (classification, segmentation, detection) run on: one thread
//! that makes batches ahead of the trainer into a bounded channel, stops early when the consumer
//! goes away, and turns a panic of that thread into an error instead of a hang.

use anyhow::{anyhow, Result};
use crossbeam_channel::{bounded, Receiver, Sender};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

/// An iterator over the items a producer thread sends, `capacity` of them queued ahead at most
/// (0: each is handed over as it is read).
pub struct Prefetch<T> {
    rx: Option<Receiver<Result<T>>>,
    handle: Option<JoinHandle<()>>,
    stop: Arc<AtomicBool>,
}

impl<T: Send + 'static> Prefetch<T> {
    /// Runs `produce` on a thread named `name`. It sends items until it is done or a send fails
    /// (the iterator was dropped); the flag it gets turns true when the iterator is dropped, so
    /// long work can stop without finishing an item nobody will read.
    pub fn spawn<F>(name: &str, capacity: usize, produce: F) -> Prefetch<T>
    where
        F: FnOnce(Sender<Result<T>>, &AtomicBool) + Send + 'static,
    {
        let (tx, rx) = bounded(capacity);
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let handle = std::thread::Builder::new()
            .name(name.into())
            .spawn(move || produce(tx, &flag))
            .expect("cannot start the data prefetch thread");
        Prefetch {
            rx: Some(rx),
            handle: Some(handle),
            stop,
        }
    }
}

impl<T> Prefetch<T> {
    /// Stops the producer and waits for it; returns its panic message if it panicked.
    fn shutdown(&mut self) -> Option<String> {
        self.stop.store(true, Ordering::Relaxed);
        self.rx = None; // unblocks a producer waiting in send()
        let handle = self.handle.take()?;
        handle.join().err().map(|p| {
            p.downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| p.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".into())
        })
    }
}

impl<T> Iterator for Prefetch<T> {
    type Item = Result<T>;

    fn next(&mut self) -> Option<Result<T>> {
        let rx = self.rx.as_ref()?;
        match rx.recv() {
            Ok(item) => Some(item),
            Err(_) => self
                .shutdown()
                .map(|msg| Err(anyhow!("the data loader thread panicked: {msg}"))),
        }
    }
}

impl<T> Drop for Prefetch<T> {
    fn drop(&mut self) {
        let _ = self.shutdown();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn yields_in_order_then_ends() {
        let items: Vec<usize> = Prefetch::spawn("t", 2, |tx, _| {
            for i in 0..5 {
                if tx.send(Ok(i)).is_err() {
                    return;
                }
            }
        })
        .map(|r| r.unwrap())
        .collect();
        assert_eq!(items, vec![0, 1, 2, 3, 4]);
    }

    #[test]
    fn a_panicking_producer_is_an_error_not_a_hang() {
        let mut p: Prefetch<u8> = Prefetch::spawn("t", 1, |tx, _| {
            tx.send(Ok(1)).unwrap();
            panic!("decoder exploded");
        });
        assert_eq!(p.next().unwrap().unwrap(), 1);
        let e = p.next().unwrap().unwrap_err().to_string();
        assert!(e.contains("panicked: decoder exploded"), "{e}");
        assert!(p.next().is_none());
    }

    #[test]
    fn dropping_the_iterator_stops_the_producer() {
        let seen_stop = Arc::new(AtomicBool::new(false));
        let seen = seen_stop.clone();
        let mut p: Prefetch<u32> = Prefetch::spawn("t", 1, move |tx, stop| {
            let mut i = 0;
            while tx.send(Ok(i)).is_ok() {
                i += 1;
            }
            seen.store(stop.load(Ordering::Relaxed), Ordering::Relaxed);
        });
        assert_eq!(p.next().unwrap().unwrap(), 0);
        drop(p); // joins the producer: it must have ended, having seen the flag
        assert!(seen_stop.load(Ordering::Relaxed));
    }
}
