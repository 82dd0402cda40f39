//! One row of the table: its runs, the pool's peak in one more untimed run, its profile.

use pollster::block_on;
use std::time::Instant;

use anyhow::Result;
use burn::tensor::Device;
use dragonedit::{device, heap, launches};

use super::pool_sampler::PoolSampler;

/// How many untimed and timed runs a row gets, and which rows run at all.
#[derive(Clone, Copy)]
pub(super) struct Plan<'a> {
    pub(super) only: Option<&'a str>,
    /// Reads the pool's reservation, where the device has a pool.
    pub(super) sampler: Option<&'a PoolSampler>,
    pub(super) warmups: usize,
    pub(super) runs: usize,
    pub(super) profile: bool,
}

impl Plan<'_> {
    /// The runs `measure` makes after the timed ones: one for the pool's peak where the device
    /// has a pool, one more for `--profile`.
    pub(super) fn untimed_after(&self) -> usize {
        usize::from(self.sampler.is_some()) + usize::from(self.profile)
    }

    pub(super) fn selects(&self, name: &str) -> bool {
        self.only.is_none_or(|only| {
            only.split(',')
                .map(str::trim)
                .any(|part| !part.is_empty() && name.contains(part))
        })
    }
}

pub(super) struct Row {
    pub(super) name: String,
    pub(super) times_ms: Vec<f64>,
    pub(super) peak_mib: Option<f64>,
    pub(super) largest_mib: Option<f64>,
    pub(super) heap_mib: f64,
    /// `--profile`'s table for this row.
    pub(super) profile: Option<String>,
}

/// Kernels listed by name in a profile; the rest are summed in one line.
const PROFILE_TOP: usize = 25;

pub(super) fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1u64 << 20) as f64
}

/// Whole MiB, or "n/a" where the pool does not say.
pub(super) fn whole_mib(v: Option<f64>) -> String {
    v.map_or("n/a".to_string(), |v| format!("{v:.0}"))
}

/// The pool as a line for stderr: what live tensors use and what is reserved now, and each
/// pool's page size with its pages held now and at most. Printed before and after each row,
/// it tells a row's own reservation from what earlier rows and the weights left.
pub(super) fn pool_line(device: &Device) -> Option<String> {
    let usage = device.memory_pool_usage()?;
    let pages: Vec<String> = device
        .memory_pool_report()?
        .iter()
        .filter(|p| p.pages_peak > 0)
        .map(|p| {
            format!(
                "{} x {:.1} MiB (peak {})",
                p.pages,
                mib(p.page_size),
                p.pages_peak
            )
        })
        .collect();
    let pages = if pages.is_empty() {
        String::new()
    } else {
        format!("; pages: {}", pages.join(", "))
    };
    Some(format!(
        "in use {:.0} MiB, reserved {:.0} MiB{pages}{}",
        mib(usage.bytes_in_use),
        mib(usage.bytes_reserved),
        bucket_list(device),
    ))
}

/// The browser layout's size buckets, as "; buckets (up to MiB: buffers now/at most, MiB
/// reserved/in use): 0.03: 4/9 0.1/0.0, ...": empty in the native layout.
fn bucket_list(device: &Device) -> String {
    let buckets = device::pool_buckets(device).unwrap_or_default();
    if buckets.is_empty() {
        return String::new();
    }
    let list: Vec<String> = buckets
        .iter()
        .map(|b| {
            format!(
                "{}: {}/{} {:.1}/{:.1}",
                short_mib(b.largest),
                b.pages,
                b.pages_peak,
                mib(b.reserved),
                mib(b.in_use)
            )
        })
        .collect();
    format!(
        "; buckets (up to MiB: buffers now/at most, MiB reserved/in use): {}",
        list.join(", ")
    )
}

/// A bucket's bound in MiB with the digits that tell it from its neighbours (they are
/// 1.4-1.6x apart, from 32 KiB up).
fn short_mib(bytes: u64) -> String {
    let v = mib(bytes);
    if v < 1.0 {
        format!("{v:.2}")
    } else {
        format!("{v:.1}")
    }
}

/// The largest single allocation since the device opened, in every pool (weights, shared
/// pages, the browser layout's buffers); `None` on the CPU.
pub(super) fn largest_buffer(device: &Device) -> Option<f64> {
    device::largest_allocation(device).map(mib)
}

/// Runs `f` to warm up (kernel compilation, autotune), then `runs` times, syncing the device
/// after each, and prints the row at once (so a run stopped by a time limit keeps the rows it
/// finished). Rows that the plan leaves out are not run.
pub(super) fn measure(
    name: &str,
    plan: Plan,
    device: &Device,
    mut f: impl FnMut() -> Result<()>,
) -> Result<Option<Row>> {
    if !plan.selects(name) {
        return Ok(None);
    }
    let Plan { warmups, runs, .. } = plan;
    eprintln!("bench: {name} ({warmups} warm-ups + {runs} runs)");
    let sync = || {
        device
            .sync()
            .map_err(|e| anyhow::anyhow!("device error: {e:?}"))
    };
    // Free pages that earlier rows left go back: the "pool before" line is then the weights
    // and what is cached between edits.
    sync()?;
    device::release_unused(device);
    if let Some(line) = pool_line(device) {
        eprintln!("bench: {name}: pool before: {line}");
    }
    let heap_base = heap::start();
    let warm = Instant::now();
    for _ in 0..warmups {
        f()?;
        sync()?;
    }
    if warmups > 0 {
        // The first run compiles the row's kernels and autotunes its products: on a fresh
        // H200 process that, not the timed runs, took most of the time.
        eprintln!(
            "bench: {name}: warm-ups took {:.1} s",
            warm.elapsed().as_secs_f64()
        );
    }
    let mut times_ms = Vec::with_capacity(runs);
    for _ in 0..runs {
        let t0 = Instant::now();
        f()?;
        sync()?;
        times_ms.push(t0.elapsed().as_secs_f64() * 1e3);
    }
    // The peak comes from one more, untimed run: reading the pool while the timed runs ran
    // slowed them (see `pool_sampler`). Free pages go back first, so the peak is what one run
    // needs above the weights, not what the runs before it (autotune's candidates among them)
    // left reserved.
    let peak_mib = match plan.sampler {
        Some(sampler) => {
            sync()?;
            device::release_unused(device);
            let (peak, before) = (sampler.watch(), sampler.readings());
            let t0 = Instant::now();
            f()?;
            sync()?;
            // A run of a few readings may have missed its peak.
            eprintln!(
                "bench: {name}: the peak's untimed run took {:.1} ms, the pool read {} times",
                t0.elapsed().as_secs_f64() * 1e3,
                sampler.readings() - before,
            );
            Some(mib(peak.take()))
        }
        None => None,
    };
    let largest_mib = largest_buffer(device);
    let heap_mib = mib(heap::peak_since(heap_base) as u64);
    if let Some(line) = pool_line(device) {
        eprintln!("bench: {name}: pool after: {line}");
    }
    let profile = if plan.profile {
        let p = block_on(launches::profile(true, &mut f, sync))?;
        let table = launches::table(name, &p, PROFILE_TOP);
        // Also now, on stderr: the tables on stdout come after the last row, which a time
        // limit may never let come.
        eprintln!("{table}");
        Some(table)
    } else {
        None
    };
    let row = Row {
        name: name.to_string(),
        times_ms,
        peak_mib,
        largest_mib,
        heap_mib,
        profile,
    };
    print_row(&row);
    Ok(Some(row))
}

pub(super) fn print_row(r: &Row) {
    use std::io::Write;
    let fastest = r.times_ms.iter().copied().fold(f64::INFINITY, f64::min);
    println!(
        "| {} | {:.1} | {:.1} | {} | {} | {:.0} |",
        r.name,
        median(&r.times_ms),
        fastest,
        whole_mib(r.peak_mib),
        whole_mib(r.largest_mib),
        r.heap_mib
    );
    // stdout is a pipe under the GPU script's `timeout`: flush each row as it lands.
    let _ = std::io::stdout().flush();
}

pub(super) fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let n = s.len();
    if n == 0 {
        f64::NAN
    } else if n % 2 == 1 {
        s[n / 2]
    } else {
        (s[n / 2 - 1] + s[n / 2]) / 2.0
    }
}
