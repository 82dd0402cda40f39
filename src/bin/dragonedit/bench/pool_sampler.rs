//! The GPU pool's reservation, read from a thread of its own every few milliseconds while a
//! peak is watched, for the bench's peak memory: each row's, and each phase's of a whole edit.
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
    /// Readings so far, for a row's stderr line (too few mean a peak may have been missed).
    readings: Arc<AtomicU64>,
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
        let readings = Arc::new(AtomicU64::new(0));
        let thread = {
            let (device, stop, watches, readings) = (
                device.clone(),
                stop.clone(),
                watches.clone(),
                readings.clone(),
            );
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    // A poisoned list only loses readings.
                    if let Ok(mut list) = watches.lock() {
                        list.retain(|w| w.strong_count() > 0);
                        // Each reading waits its turn on the device's server, between the
                        // work being measured: on lavapipe, reading through a timed run
                        // made a UNet pass 8-12 % slower. So nothing is read while nothing
                        // is watched.
                        if !list.is_empty() {
                            let now = reserved(&device);
                            readings.fetch_add(1, Ordering::Relaxed);
                            for most in list.iter().filter_map(Weak::upgrade) {
                                most.fetch_max(now, Ordering::Relaxed);
                            }
                        }
                    }
                    std::thread::sleep(EVERY);
                }
            })
        };
        Some(Self {
            device: device.clone(),
            stop,
            readings,
            watches,
            thread: Some(thread),
        })
    }

    /// How many times the thread has read the pool.
    pub fn readings(&self) -> u64 {
        self.readings.load(Ordering::Relaxed)
    }

    /// Whether a [`Peak`] is being kept, i.e. the pool is being read.
    pub fn watching(&self) -> bool {
        self.watches
            .lock()
            .is_ok_and(|list| list.iter().any(|w| w.strong_count() > 0))
    }

    /// A peak counted from what is reserved now; several can run at once (a row's and its
    /// phases'). The pool is read only while a peak is kept.
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The pool is read only while a peak is watched: readings between a timed run's kernels
    /// slowed it.
    #[test]
    fn reads_the_pool_only_while_a_peak_is_watched() {
        let Some(device) = dragonedit::device::test_gpu() else {
            return;
        };
        let sampler = PoolSampler::start(&device).expect("a GPU device has a pool");
        // Something reserved, for the peak to see.
        let held = burn::tensor::Tensor::<1>::zeros([1 << 16], &device);
        let _ = held.to_data();
        let idle = EVERY * 20;
        std::thread::sleep(idle);
        assert_eq!(sampler.readings(), 0, "read with nothing watched");
        let peak = sampler.watch();
        assert!(sampler.watching());
        std::thread::sleep(idle);
        let watched = sampler.readings();
        // 20 periods; a loaded test machine may let the thread run less often.
        assert!(watched >= 2, "{watched} readings in {idle:?}");
        assert!(peak.take() > 0, "a held tensor and nothing reserved?");
        drop(peak);
        // The reading under way when the watch went may still land.
        std::thread::sleep(EVERY * 2);
        let after = sampler.readings();
        std::thread::sleep(idle);
        assert!(!sampler.watching());
        assert_eq!(
            sampler.readings(),
            after,
            "read after the watch was dropped"
        );
    }
}
