//! Which GPU kernels a pass launches, how often, and how long each took on the device (`bench
//! --profile`, native only). cubecl's launch observer sees every launch the process issues
//! (fused kernels included, when fusion flushes them); each launch is bracketed by device
//! timestamps and the measurements are read once the pass is over, so kernels still run back
//! to back.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use burn::cubecl::logging::{
    LaunchObservation, LaunchObserver, ProfileDuration, TimingMethod, TimingRequest,
};

/// What one kernel (by name) added up to in a pass.
#[derive(Debug, Default, Clone)]
pub struct KernelTotal {
    pub launches: usize,
    /// Summed over the launches whose measurement came back.
    pub time: Duration,
}

/// A pass's launches, by kernel, and how they were timed.
#[derive(Debug, Default)]
pub struct PassProfile {
    pub kernels: Vec<(String, KernelTotal)>,
    /// Timed by the device's timestamps (the rest, if any, by the host's clock around a
    /// blocking submit, which includes the submit: wgpu falls back to it when timestamp
    /// queries run out).
    pub device_timed: usize,
    pub host_timed: usize,
}

impl PassProfile {
    pub fn time(&self) -> Duration {
        self.kernels.iter().map(|(_, k)| k.time).sum()
    }

    pub fn launches(&self) -> usize {
        self.kernels.iter().map(|(_, k)| k.launches).sum()
    }
}

#[derive(Default)]
struct Recorder {
    timed: bool,
    state: Mutex<Recorded>,
}

#[derive(Default)]
struct Recorded {
    launches: HashMap<&'static str, usize>,
    pending: Vec<(&'static str, ProfileDuration)>,
    durations: Vec<(&'static str, Duration, TimingMethod)>,
}

impl Recorder {
    fn state(&self) -> std::sync::MutexGuard<'_, Recorded> {
        // A panic in another launching thread leaves counts that are still counts.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl LaunchObserver for Recorder {
    fn launched(&self, kernel: &'static str) {
        *self.state().launches.entry(kernel).or_default() += 1;
    }

    fn timing(&self) -> TimingRequest {
        if self.timed {
            TimingRequest::Deferred
        } else {
            TimingRequest::None
        }
    }

    fn profiled(&self, kernel: &'static str, profile: ProfileDuration) {
        self.state().pending.push((kernel, profile));
    }

    fn timed(&self, kernel: &'static str, duration: Duration, method: TimingMethod) {
        self.state().durations.push((kernel, duration, method));
    }
}

/// Runs `pass` with every kernel launch counted, and timed on the device when `timed`. `sync`
/// is called before the observation ends, so every launch of the pass has been issued (fusion
/// issues its kernels lazily).
pub async fn profile<E>(
    timed: bool,
    pass: impl FnOnce() -> Result<(), E>,
    sync: impl FnOnce() -> Result<(), E>,
) -> Result<PassProfile, E> {
    let recorder = Arc::new(Recorder {
        timed,
        ..Recorder::default()
    });
    let observation = LaunchObservation::new(recorder.clone());
    let ran = pass().and_then(|()| sync());
    drop(observation);
    ran?;
    let recorded = std::mem::take(&mut *recorder.state());
    Ok(summarize(recorded).await)
}

async fn summarize(recorded: Recorded) -> PassProfile {
    let mut by_name: HashMap<String, KernelTotal> = HashMap::new();
    let mut out = PassProfile::default();
    for (kernel, n) in recorded.launches {
        by_name.entry(short_name(kernel)).or_default().launches += n;
    }
    let mut add = |kernel: &str, duration: Duration, method: TimingMethod| {
        let total = by_name.entry(short_name(kernel)).or_default();
        total.time += duration;
        match method {
            TimingMethod::Device => out.device_timed += 1,
            TimingMethod::System => out.host_timed += 1,
        }
    };
    for (kernel, profile) in recorded.pending {
        let method = profile.timing_method();
        if let Some(ticks) = profile.resolve().await {
            add(kernel, ticks.duration(), method);
        }
    }
    for (kernel, duration, method) in recorded.durations {
        add(kernel, duration, method);
    }
    let mut kernels: Vec<_> = by_name.into_iter().collect();
    kernels.sort_by(|a, b| {
        b.1.time
            .cmp(&a.1.time)
            .then(b.1.launches.cmp(&a.1.launches))
            .then(a.0.cmp(&b.0))
    });
    out.kernels = kernels;
    out
}

/// A kernel's type name without its module path or generic arguments, which differ per
/// element type and would split one kernel into several rows.
fn short_name(kernel: &str) -> String {
    let base = kernel.split('<').next().unwrap_or(kernel);
    base.rsplit("::").next().unwrap_or(base).trim().to_string()
}

/// The profile as a markdown table: the `top` kernels by device time, the rest summed.
pub fn table(name: &str, p: &PassProfile, top: usize) -> String {
    let total = p.time().as_secs_f64() * 1e3;
    let mut s = format!(
        "\n#### profile: {name}\n\n{} launches, {total:.1} ms of kernel time summed ({} timed \
         on the device, {} by the host's clock)\n\n| kernel | launches | ms | share |\n|---|---|---|---|\n",
        p.launches(),
        p.device_timed,
        p.host_timed
    );
    let share = |ms: f64| {
        if total > 0.0 {
            format!("{:.1} %", 100.0 * ms / total)
        } else {
            "n/a".to_string()
        }
    };
    for (kernel, k) in p.kernels.iter().take(top) {
        let ms = k.time.as_secs_f64() * 1e3;
        s += &format!("| {kernel} | {} | {ms:.2} | {} |\n", k.launches, share(ms));
    }
    if p.kernels.len() > top {
        let rest = &p.kernels[top..];
        let launches: usize = rest.iter().map(|(_, k)| k.launches).sum();
        let ms: f64 = rest.iter().map(|(_, k)| k.time.as_secs_f64() * 1e3).sum();
        s += &format!(
            "| {} other kernels | {launches} | {ms:.2} | {} |\n",
            rest.len(),
            share(ms)
        );
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_names_drop_paths_and_generics() {
        assert_eq!(
            short_name("cubecl_std::tensor::MatmulKernel<f16, cubecl::F<32>>"),
            "MatmulKernel"
        );
        assert_eq!(short_name("plain"), "plain");
    }
}
