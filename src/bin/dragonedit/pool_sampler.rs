//! The GPU pool's reservation, read from a thread of its own every few milliseconds, for the
//! bench's peak memory: each row's, and each phase's of a whole edit.
//!
//! burn's pool report gives each sliced pool's peak page count, so summing them adds peaks
//! that may have come at different times and forgets a pool of outgrown pages once it
//! empties, and the browser's layout (one page per allocation) reports no peak at all.
//! Reading what is reserved only at an edit's progress reports missed the VAE's phases: the
//! engine hands their pages back before it reports the next phase. Reserved memory only
//! falls when pages are handed back, so a reading every few milliseconds catches a peak
//! unless pages come and go between two readings.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::thread::JoinHandle;
use std::time::Duration;

use burn::tensor::Device;

/// How often the pool is read: a phase's allocations live for milliseconds on a fast GPU and
/// for seconds on lavapipe.
pub const EVERY: Duration = Duration::from_millis(5);

type Watches = Arc<Mutex<Vec<Weak<AtomicU64>>>>;

pub struct PoolSampler {
    device: Device,
    stop: Arc<AtomicBool>,
    /// The peaks being kept; a dropped [`Peak`] leaves the list at the next reading.
    watches: Watches,
    thread: Option<JoinHandle<()>>,
}

/// The most a pool reserved since this watch began or was last taken.
pub struct Peak {
    device: Device,
    most: Arc<AtomicU64>,
}

fn reserved(device: &Device) -> u64 {
    device.memory_pool_usage().map_or(0, |u| u.bytes_reserved)
}

impl PoolSampler {
    /// Starts reading `device`'s pool; `None` where it has none (the CPU backend).
    pub fn start(device: &Device) -> Option<Self> {
        device.memory_pool_usage()?;
        let stop = Arc::new(AtomicBool::new(false));
        let watches = Watches::default();
        let thread = {
            let (device, stop, watches) = (device.clone(), stop.clone(), watches.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let now = reserved(&device);
                    // A poisoned list only loses readings.
                    if let Ok(mut list) = watches.lock() {
                        list.retain(|w| {
                            w.upgrade()
                                .map(|most| most.fetch_max(now, Ordering::Relaxed))
                                .is_some()
                        });
                    }
                    std::thread::sleep(EVERY);
                }
            })
        };
        Some(Self {
            device: device.clone(),
            stop,
            watches,
            thread: Some(thread),
        })
    }

    /// A peak counted from what is reserved now; several can run at once (a row's and its
    /// phases').
    pub fn watch(&self) -> Peak {
        let most = Arc::new(AtomicU64::new(reserved(&self.device)));
        if let Ok(mut list) = self.watches.lock() {
            list.push(Arc::downgrade(&most));
        }
        Peak {
            device: self.device.clone(),
            most,
        }
    }
}

impl Peak {
    /// The most bytes reserved since the watch began or was last taken, including now; the
    /// next call counts from what is reserved now.
    pub fn take(&self) -> u64 {
        let now = reserved(&self.device);
        self.most.swap(now, Ordering::Relaxed).max(now)
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
