//! Matrix products split along their shared axis ("split-K") where their outputs are too few to
//! occupy a GPU.
//!
//! burn's WGSL matmul gives each workgroup a block of the output (a stage of 8 planes) and walks
//! the whole shared axis in it. At the UNet's low resolutions the outputs are few and the shared
//! axis long: a 3x3 convolution 1280 -> 1280 at an 8x8 latent, batch 2, is `[1280, 11520] x
//! [11520, 64]` twice, a handful of workgroups on a card with 132 multiprocessors, each walking
//! 11520 steps. Cut into `p` parts along that axis, the same product is `p` times as many
//! workgroups, each walking `1/p` of it, and one sum of the `p` partial outputs after.
//!
//! Off unless asked for ([`set_split_outputs`], the bench's `--split-outputs`), and read at
//! each product, so the bench can time a pass both ways in one process: what it gains depends
//! on the device and on burn's autotune, and it has not yet been measured on a GPU
//! (docs/BENCHMARKS.md, the changes table).
//!
//! Which kernel computes each product is a setting of its own ([`ProductKernel`]): natively
//! burn's autotuned choice, the one fixed kernel the browser runs ([`fixed_matmul`]), or one of
//! the unit routines a browser could run instead ([`unit_matmul`]).

use burn::tensor::Tensor;
use std::sync::atomic::{AtomicUsize, Ordering};

use super::fixed_product::{UnitRoutine, fixed_matmul, unit_matmul};

/// The most parts a product is cut into.
pub const MAX_PARTS: usize = 8;

/// The shortest stretch of the shared axis one part walks, so that a part's walk stays long next
/// to the sum of the partial outputs (a guess until the bench's product rows run on a GPU).
const MIN_PART_LEN: usize = 256;

static SPLIT_OUTPUTS: AtomicUsize = AtomicUsize::new(0);

/// [`ProductKernel`] as a number: 0 tuned, 1 the browser's, 2 + i the unit routine i.
static KERNEL: AtomicUsize = AtomicUsize::new(0);

/// Which kernel computes a product.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ProductKernel {
    /// burn's matmul as the build has it: natively autotune's pick for the shape and device,
    /// in the browser its one fixed strategy.
    #[default]
    Tuned,
    /// The browser's fixed strategy in every build ([`fixed_matmul`]), so that a native run
    /// times the products a tab would run.
    Browser,
    /// One of cubek's unit routines, all of which a browser could run ([`unit_matmul`]).
    Unit(UnitRoutine),
}

impl ProductKernel {
    /// The process's setting ([`set_product_kernel`]) as it is now.
    pub fn current() -> Self {
        match KERNEL.load(Ordering::Relaxed) {
            0 => Self::Tuned,
            1 => Self::Browser,
            n => Self::Unit(UnitRoutine::ALL[(n - 2).min(UnitRoutine::ALL.len() - 1)]),
        }
    }

    /// `a x b` (batches broadcast as in burn's `matmul`) by this kernel.
    pub fn matmul<const D: usize>(self, a: Tensor<D>, b: Tensor<D>) -> Tensor<D> {
        match self {
            Self::Tuned => a.matmul(b),
            Self::Browser => fixed_matmul(a, b),
            Self::Unit(routine) => unit_matmul(a, b, routine),
        }
    }
}

/// Every product from now on runs `kernel`.
pub fn set_product_kernel(kernel: ProductKernel) {
    let n = match kernel {
        ProductKernel::Tuned => 0,
        ProductKernel::Browser => 1,
        ProductKernel::Unit(routine) => 2 + routine.index(),
    };
    KERNEL.store(n, Ordering::Relaxed);
}

/// Products with fewer than `outputs` output elements (over the batch) are split from now on;
/// 0 splits none.
pub fn set_split_outputs(outputs: usize) {
    SPLIT_OUTPUTS.store(outputs, Ordering::Relaxed);
}

/// Which products are split.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ProductSplit {
    /// Products with fewer output elements than this are split; 0: none.
    below: usize,
}

impl ProductSplit {
    /// The process's setting ([`set_split_outputs`]) as it is now: the layers ask at each call.
    pub fn current() -> Self {
        Self::below(SPLIT_OUTPUTS.load(Ordering::Relaxed))
    }

    /// Split products of fewer than `outputs` output elements.
    pub fn below(outputs: usize) -> Self {
        Self { below: outputs }
    }

    /// Into how many parts a product of `outputs` output elements over a shared axis of `k`
    /// is cut: the fewest powers of two that bring it to the threshold, at most [`MAX_PARTS`],
    /// each part at least `MIN_PART_LEN` (256) long and all of one length.
    pub fn parts(self, outputs: usize, k: usize) -> usize {
        let mut parts = 1;
        while outputs.saturating_mul(parts) < self.below
            && parts < MAX_PARTS
            && k.is_multiple_of(parts * 2)
            && k / (parts * 2) >= MIN_PART_LEN
        {
            parts *= 2;
        }
        parts
    }

    /// `a x b` for `a` `[B1, m, k]` and `b` `[B2, k, n]` (batches broadcast as in burn's
    /// `matmul`), split as [`parts`](Self::parts) says.
    pub fn matmul(self, a: Tensor<3>, b: Tensor<3>) -> Tensor<3> {
        let [ba, m, k] = a.dims();
        let bb = b.dims()[0];
        let n = b.dims()[2];
        let parts = self.parts(ba.max(bb) * m * n, k);
        matmul_in_parts(a, b, parts)
    }
}

/// `a x b` as the sum of `parts` products over consecutive stretches of the shared axis (which
/// `parts` must divide): one batched product of `[B, parts, m, n]` partial outputs, then their
/// sum. One part is the plain product. The products run [`ProductKernel::current`].
pub fn matmul_in_parts(a: Tensor<3>, b: Tensor<3>, parts: usize) -> Tensor<3> {
    let kernel = ProductKernel::current();
    if parts <= 1 {
        return kernel.matmul(a, b);
    }
    let [ba, m, k] = a.dims();
    let [bb, _, n] = b.dims();
    debug_assert!(k.is_multiple_of(parts), "{parts} parts of {k}");
    let part = k / parts;
    // [B1, m, k] -> [B1, parts, m, part] is a view with the parts' stride where `a` is
    // contiguous; b's parts are consecutive rows, so its reshape is free.
    let a = a.reshape([ba, m, parts, part]).swap_dims(1, 2);
    let b = b.reshape([bb, parts, part, n]);
    let partial = kernel.matmul(a, b);
    partial.sum_dim(1).reshape([ba.max(bb), m, n])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{max_abs, wave};
    use burn::tensor::{DType, Device};

    #[test]
    fn parts_follow_the_threshold_and_the_shared_axis() {
        let split = ProductSplit::below(1 << 20);
        // 8x8 latent, 3x3 1280 -> 1280, batch 2: 163840 outputs, 8 parts of 1440.
        assert_eq!(split.parts(2 * 1280 * 64, 11520), 8);
        // 32x32, 640 -> 640: 1.3M outputs, already over.
        assert_eq!(split.parts(2 * 640 * 1024, 5760), 1);
        // 16x16, 1280 -> 1280: 655360 outputs, twice is enough.
        assert_eq!(split.parts(2 * 1280 * 256, 11520), 2);
        // A short shared axis is not cut below MIN_PART_LEN, nor into unequal parts.
        assert_eq!(split.parts(1000, 512), 2);
        assert_eq!(split.parts(1000, 320), 1);
        assert_eq!(split.parts(1000, 1025), 1);
        assert_eq!(ProductSplit::below(0).parts(10, 1 << 14), 1);
    }

    /// The split product against burn's own on `device`, both in f32 and in f16, against the
    /// f32 product: with one batch broadcast (a convolution's weight) and a strided operand.
    fn split_equals_plain_on(device: &Device) {
        let a = wave([1, 24, 1024], 0.37, [1.0, 0.1], device);
        let b = wave([2, 1024, 40], 0.11, [1.0, -0.2], device);
        let exact = a.clone().matmul(b.clone());
        let scale = max_abs(exact.clone());
        let abs_sum = max_abs(a.clone().abs().matmul(b.clone().abs()));
        for parts in [2, 4, 8] {
            let split = matmul_in_parts(a.clone(), b.clone(), parts);
            assert_eq!(split.dims(), [2, 24, 40]);
            let err = max_abs(split - exact.clone());
            // Two f32 sums of 1024 terms in different orders: each within k·eps·Σ|a||b|
            // (6e-5 of it) at worst, about √k·eps (4e-6) in practice.
            assert!(err <= 1e-5 * abs_sum, "{parts} parts: {err} of {abs_sum}");

            // In f16 each partial output is rounded to f16, and so is each step of their
            // sum: at most 2 · parts roundings of 2^-11 of Σ|a||b| over the plain f16 product's
            // error (a wrong layout is off by the size of the result itself).
            let (a16, b16) = (a.clone().cast(DType::F16), b.clone().cast(DType::F16));
            let plain = max_abs(a16.clone().matmul(b16.clone()).cast(DType::F32) - exact.clone());
            let split = max_abs(matmul_in_parts(a16, b16, parts).cast(DType::F32) - exact.clone());
            let rounding = 2.0 * parts as f32 * abs_sum / 2048.0;
            assert!(
                split <= plain + rounding && rounding < scale,
                "{parts} parts in f16: {split} against {plain} (+{rounding}, scale {scale})"
            );
        }
        // A transposed (strided) left operand, as the convolution's pull-back passes.
        let at = wave([1, 1024, 24], 0.53, [1.0, 0.0], device).swap_dims(1, 2);
        let at_abs = at.clone().abs();
        let exact = at.clone().matmul(b.clone());
        let split = matmul_in_parts(at, b.clone(), 4);
        let err = max_abs(split - exact);
        let abs_sum = max_abs(at_abs.matmul(b.abs()));
        assert!(err <= 1e-5 * abs_sum, "strided: {err} of {abs_sum}");
    }

    #[test]
    fn split_equals_plain_on_the_cpu() {
        split_equals_plain_on(&crate::device::cpu());
    }

    #[test]
    fn split_equals_plain_on_the_gpu() {
        let Some(device) = crate::device::test_gpu() else {
            return;
        };
        split_equals_plain_on(&device);
    }
}
