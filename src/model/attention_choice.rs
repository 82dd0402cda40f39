//! Which way a native GPU computes the UNet's attention faster, timed on that GPU, once per
//! shape. burn's fused op (autotuned natively) and our flash kernel (`flash_attention`) rank
//! differently from one device to the next: on lavapipe the fused op wins the op alone, while
//! on an H200 the kernel took 3.8 ms at `[2,8,4096,40]` against the fused op's 21-33 ms (12.6 on
//! another H200 machine: its autotune varies; docs/BENCHMARKS.md). So with
//! `AttentionStrategy::Auto` the first call of each shape runs both on its own inputs, compares
//! their results and keeps the faster way for the process, as the browser does for
//! convolutions (`conv_choice`).

use std::sync::{Mutex, PoisonError};

use web_time::Instant;

use burn::tensor::{DType, Tensor};

use super::conv_choice::relative_error;
use super::flash_attention::flash_attention;

/// Timed runs of each way, after a first call that compiles (and autotunes) it.
const RUNS: usize = 3;

/// One attention call's shape: the batch, heads, query and key counts, head width, dtype.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AttentionShape {
    pub batch: usize,
    pub heads: usize,
    pub queries: usize,
    pub keys: usize,
    pub head_width: usize,
    pub dtype: DType,
}

impl AttentionShape {
    fn of(q: &Tensor<3>, k: &Tensor<3>, heads: usize) -> Self {
        let [batch, queries, c] = q.dims();
        Self {
            batch,
            heads,
            queries,
            keys: k.dims()[1],
            head_width: c / heads.max(1),
            dtype: q.dtype(),
        }
    }
}

/// The median milliseconds of each way, and how far each result is from the same attention
/// computed in f32 (by the fused op).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AttentionTimings {
    pub fused_ms: f64,
    pub kernel_ms: f64,
    /// `max |fused − f32| / max |f32|`: 0 in f32, where the fused op is the reference; in
    /// f16 its own rounding (burn's kernels may sum in f16).
    pub fused_error: f64,
    /// The same for the kernel; infinite where its result is not finite.
    pub kernel_error: f64,
    /// What the kernel may differ by anyway: it sums `keys` products in its own order and
    /// rounds its result to the dtype once (f32 1e-3, f16 2e-2, with room). A kernel that
    /// computes something else on some device is off by about the values' own size.
    pub tolerance: f64,
}

impl AttentionTimings {
    /// Whether the kernel is the faster way and computes the attention: within the tolerance
    /// of the f32 result, or no further from it than the fused op. The fused op on a tie.
    pub fn kernel_wins(&self) -> bool {
        self.kernel_ms < self.fused_ms && self.kernel_error <= self.tolerance.max(self.fused_error)
    }
}

static TIMED: Mutex<Vec<(AttentionShape, AttentionTimings)>> = Mutex::new(Vec::new());

fn timed_list() -> std::sync::MutexGuard<'static, Vec<(AttentionShape, AttentionTimings)>> {
    // A panic in another thread leaves timings that are still timings.
    TIMED.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Every shape timed so far in this process, in the order timed (`bench` prints them).
pub fn timed() -> Vec<(AttentionShape, AttentionTimings)> {
    timed_list().clone()
}

/// Whether our kernel computes attention of `q` over `k`, `v` (`[b, n, heads · d]` tokens)
/// faster than `fused` on their device: timed on these inputs at the first call of their
/// shape, remembered after. If the device fails a read (lost), the fused op, untimed: the
/// edit's own next read reports the loss.
pub fn kernel_is_faster(
    q: &Tensor<3>,
    k: &Tensor<3>,
    v: &Tensor<3>,
    heads: usize,
    fused: impl Fn(Tensor<3>, Tensor<3>, Tensor<3>) -> Tensor<3>,
) -> bool {
    let shape = AttentionShape::of(q, k, heads);
    if let Some((_, timings)) = timed_list().iter().find(|(s, _)| *s == shape) {
        return timings.kernel_wins();
    }
    let kernel = |q, k, v| flash_attention(q, k, v, heads);
    let Some(timings) = time_both(q, k, v, &fused, &kernel) else {
        return false;
    };
    timed_list().push((shape, timings));
    timings.kernel_wins()
}

type Way<'a> = &'a dyn Fn(Tensor<3>, Tensor<3>, Tensor<3>) -> Tensor<3>;

fn time_both(
    q: &Tensor<3>,
    k: &Tensor<3>,
    v: &Tensor<3>,
    fused: Way<'_>,
    kernel: Way<'_>,
) -> Option<AttentionTimings> {
    let run = |way: Way<'_>| way(q.clone(), k.clone(), v.clone());
    let by_fused = values(run(fused))?;
    let by_kernel = values(run(kernel))?;
    let f32_of = |t: &Tensor<3>| t.clone().cast(DType::F32);
    let in_f32;
    let reference = if q.dtype() == DType::F32 {
        &by_fused
    } else {
        in_f32 = values(fused(f32_of(q), f32_of(k), f32_of(v)))?;
        &in_f32
    };
    let fused_ms = median_ms(|| finish(run(fused)))?;
    let kernel_ms = median_ms(|| finish(run(kernel)))?;
    Some(AttentionTimings {
        fused_ms,
        kernel_ms,
        fused_error: relative_error(&by_fused, reference),
        kernel_error: relative_error(&by_kernel, reference),
        tolerance: if q.dtype() == DType::F32 { 1e-3 } else { 2e-2 },
    })
}

/// `t`'s values in f32 on the host. Taking the bytes is what waits for the device (see
/// [`finish`]).
fn values<const D: usize>(t: Tensor<D>) -> Option<Vec<f32>> {
    t.cast(DType::F32)
        .try_into_data()
        .ok()?
        .try_to_vec::<f32>()
        .ok()
}

/// Waits for `t`, reading back one value of it. The value's bytes must be taken: burn's
/// `TensorData` holds a read that completes only when they are, so a read left untouched
/// returned in 0.2 ms before a 270 ms kernel had run (lavapipe), and the H200's first timings
/// were 10-40 times too short.
fn finish(t: Tensor<3>) -> Option<()> {
    values(t.sum()).map(|_| ())
}

/// The median milliseconds of [`RUNS`] calls of `run`.
fn median_ms(run: impl Fn() -> Option<()>) -> Option<f64> {
    let mut times = Vec::with_capacity(RUNS);
    for _ in 0..RUNS {
        let start = Instant::now();
        run()?;
        times.push(start.elapsed().as_secs_f64() * 1e3);
    }
    times.sort_by(f64::total_cmp);
    Some(times[times.len() / 2])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_only_where_faster_and_accurate() {
        let timings = |kernel_ms, kernel_error, fused_error| AttentionTimings {
            fused_ms: 2.0,
            kernel_ms,
            fused_error,
            kernel_error,
            tolerance: 1e-3,
        };
        assert!(timings(1.0, 1e-6, 0.0).kernel_wins());
        assert!(!timings(3.0, 1e-6, 0.0).kernel_wins());
        assert!(!timings(2.0, 1e-6, 0.0).kernel_wins());
        // Faster, but computing something else.
        assert!(!timings(1.0, 0.5, 0.0).kernel_wins());
        assert!(!timings(1.0, f64::INFINITY, 0.0).kernel_wins());
        // Past the tolerance, but no further from f32 than the fused op itself.
        assert!(timings(1.0, 2e-3, 3e-3).kernel_wins());
    }

    /// On the test GPU both ways run on real inputs, their results agree with attention in
    /// f32, the timings are recorded once per shape (the dtype part of it), and the choice
    /// follows them.
    #[test]
    fn times_each_shape_once_on_the_gpu() {
        let Some(device) = crate::device::test_gpu() else {
            return;
        };
        let (heads, d) = (2, 8);
        let c = heads * d;
        let fused = |q: Tensor<3>, k: Tensor<3>, v: Tensor<3>| {
            let split = |t: Tensor<3>| t.reshape([1, 37, heads, d]).swap_dims(1, 2);
            let o = crate::model::attention::attend_fused(split(q), split(k), split(v));
            o.swap_dims(1, 2).reshape([1, 37, c])
        };
        // f32: both sum 37 products in f32 in their own orders, the fused op is the
        // reference. f16: each rounds its result to f16 (2^-11 of the largest value), the
        // fused op perhaps its sums too; the check's own tolerance.
        for (dtype, bound) in [(DType::F32, 1e-5), (DType::F16, 2e-2)] {
            let made = |seed| crate::model::wave([1, 37, c], seed, [1.0, 0.0], &device).cast(dtype);
            let (q, k, v) = (made(0.37), made(0.53), made(0.71));
            let shape = AttentionShape::of(&q, &k, heads);
            let first = kernel_is_faster(&q, &k, &v, heads, fused);
            let again = kernel_is_faster(&q, &k, &v, heads, |_, _, _| panic!("timed twice"));
            assert_eq!(first, again);
            let timed: Vec<_> = timed().into_iter().filter(|(s, _)| *s == shape).collect();
            assert_eq!(timed.len(), 1, "{timed:?}");
            let t = timed[0].1;
            assert!(
                t.kernel_error < bound && t.fused_error < bound,
                "{dtype:?} {t:?}"
            );
            if dtype == DType::F32 {
                assert_eq!(t.fused_error, 0.0, "{t:?}");
            }
            assert!(t.fused_ms > 0.0 && t.kernel_ms > 0.0, "{t:?}");
            assert_eq!(first, t.kernel_wins());
        }
    }
}
