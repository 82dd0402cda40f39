//! The GPU pool's reservation, read from a thread of its own every few milliseconds, for the
//! bench's whole edits.
//!
//! burn's pool report gives each sliced pool's peak page count, so the bench's "peak pool" sums
//! peaks that may have come at different times and forgets a pool of outgrown pages once it
//! empties, and the browser's layout (one page per allocation) reports no peak at all.
//! Reading what is reserved only at the edit's progress reports missed the VAE's phases: the
//! engine hands their pages back before it reports the next phase. Reserved memory only falls when pages are handed back, so a reading every few
//! milliseconds catches a phase's peak unless pages come and go between two readings.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use burn::tensor::Device;

/// How often the pool is read: a phase's allocations live for milliseconds on a fast GPU and
/// for seconds on lavapipe.
pub const EVERY: Duration = Duration::from_millis(5);

pub struct PoolSampler {
    device: Device,
    stop: Arc<AtomicBool>,
    peak: Arc<AtomicU64>,
    thread: Option<JoinHandle<()>>,
}

impl PoolSampler {
    /// Starts reading `device`'s pool; `None` where it has none (the CPU backend).
    pub fn start(device: &Device) -> Option<Self> {
        let now = device.memory_pool_usage()?.bytes_reserved;
        let stop = Arc::new(AtomicBool::new(false));
        let peak = Arc::new(AtomicU64::new(now));
        let thread = {
            let (device, stop, peak) = (device.clone(), stop.clone(), peak.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    if let Some(u) = device.memory_pool_usage() {
                        peak.fetch_max(u.bytes_reserved, Ordering::Relaxed);
                    }
                    std::thread::sleep(EVERY);
                }
            })
        };
        Some(Self {
            device: device.clone(),
            stop,
            peak,
            thread: Some(thread),
        })
    }

    /// The most bytes reserved since the last call (or the start), including now; the next
    /// call counts from what is reserved now.
    pub fn take_peak(&self) -> u64 {
        let now = self
            .device
            .memory_pool_usage()
            .map_or(0, |u| u.bytes_reserved);
        self.peak.swap(now, Ordering::Relaxed).max(now)
    }
}

impl Drop for PoolSampler {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            // A panic in the reading thread loses readings, not the bench.
            let _ = thread.join();
        }
    }
}
