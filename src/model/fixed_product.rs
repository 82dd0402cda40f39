//! The browser's matrix product, natively: burn's matmul with its one fixed strategy instead of
//! autotune's choice.
//!
//! The wasm build has no autotune (its subgroup candidates crash on SwiftShader, shared BURN.md
//! §2), so in the browser every product runs the strategy burn falls back to without it: the
//! accelerated (cmma) routine where the device offers one, which WGSL never does, otherwise
//! cubek's `SimpleUnit` with its default tile. burn-fusion's fused products try the same cmma
//! routine first and, refused, run the product alone and the fused element-wise work after it.
//! Natively the same product is autotune's pick among a dozen routines. This op runs the
//! browser's choice on a native device, so that the bench can time the browser's products on a
//! real GPU, where no browser can run here.

use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::tensor::FloatTensor;
use burn::backend::{Autodiff, Backend, Dispatch, TensorMetadata, backend_extension};
use burn::tensor::{Shape, Tensor};
use burn_cubecl::CubeBackend;
use burn_cubecl::kernel::matmul::{MatmulStrategy, matmul};

/// `a x b` for `a` `[.., m, k]` and `b` `[.., k, n]` (batch axes broadcast as in burn's
/// `matmul`) by the kernel burn runs in the browser. On burn's CPU backend and under autodiff,
/// burn's own product.
pub fn fixed_matmul<const D: usize>(a: Tensor<D>, b: Tensor<D>) -> Tensor<D> {
    Tensor::from_dispatch(Dispatch::fixed_matmul(a.into_dispatch(), b.into_dispatch()))
}

fn product_shape(a: &Shape, b: &Shape) -> Shape {
    let rank = a.num_dims();
    let mut dims: Vec<usize> = (0..rank - 2).map(|i| a[i].max(b[i])).collect();
    dims.extend([a[rank - 2], b[rank - 1]]);
    Shape::from(dims)
}

#[backend_extension(Cube, Fusion, Flex: cfg(not(target_family = "wasm")), Autodiff)]
pub trait FixedProductOps: Backend {
    /// See [`fixed_matmul`]. The default is the backend's own product.
    #[fusion(dtype = a, shape = product_shape(a, b))]
    fn fixed_matmul(a: FloatTensor<Self>, b: FloatTensor<Self>) -> FloatTensor<Self> {
        Self::float_matmul(a, b)
    }
}

#[cfg(not(target_family = "wasm"))]
impl FixedProductOps for burn::backend::Flex {}

impl<B: Backend + FixedProductOps, C: CheckpointStrategy> FixedProductOps for Autodiff<B, C> {}

impl FixedProductOps for CubeBackend {
    fn fixed_matmul(a: FloatTensor<Self>, b: FloatTensor<Self>) -> FloatTensor<Self> {
        let dtype = a.dtype();
        match matmul(a.clone(), b.clone(), None, MatmulStrategy::Cube, dtype) {
            Ok(out) => out,
            // The fixed strategy refused the operands (a layout none of its routines takes):
            // burn's own product, as burn-fusion's fallback would run.
            Err(_) => <Self as burn::backend::ops::FloatTensorOps<Self>>::float_matmul(a, b),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{max_abs, wave};
    use burn::tensor::{DType, Device};

    /// The fixed kernel's product against burn's (autotune's pick natively) on `device`, with
    /// a broadcast batch (a convolution's weight), a strided operand (the pull-back's transposed
    /// weight) and four axes (split-K's parts), in f32 and in f16.
    fn fixed_equals_tuned_on(device: &Device) {
        let a = wave([1, 24, 1024], 0.37, [1.0, 0.1], device);
        let b = wave([2, 1024, 40], 0.11, [1.0, -0.2], device);
        let at = wave([1, 1024, 24], 0.53, [1.0, 0.0], device).swap_dims(1, 2);
        let check = |a: Tensor<3>, b: Tensor<3>, what: &str, f16: bool| {
            let tuned = a.clone().matmul(b.clone());
            let fixed = fixed_matmul(a.clone(), b.clone());
            assert_eq!(fixed.dims(), tuned.dims(), "{what}");
            // Two f32 sums of 1024 terms, perhaps in different orders: each within
            // k·eps·Σ|a||b| (6e-5 of it) at worst, about √k·eps (4e-6) in practice; a wrong
            // layout or batch is off by the size of the result itself.
            let abs_sum = max_abs(a.clone().abs().matmul(b.clone().abs()));
            let err = max_abs(fixed - tuned.clone());
            assert!(err <= 1e-5 * abs_sum, "{what}: {err} of {abs_sum}");
            // In f16 both round the inputs and the output alike and may sum in different
            // orders and precisions: within the 2e-2 of the result's largest value that the
            // parity tests allow an f16 product. Only where the result is not a cancellation
            // (the strided case's is 1e-3 of Σ|a||b|), or no bound would be both safe and tight.
            if f16 {
                let (a16, b16) = (a.cast(DType::F16), b.cast(DType::F16));
                let tuned16 = a16.clone().matmul(b16.clone()).cast(DType::F32);
                let fixed16 = fixed_matmul(a16, b16).cast(DType::F32);
                let scale = max_abs(tuned);
                let err = max_abs(fixed16 - tuned16);
                assert!(err <= 2e-2 * scale, "{what} in f16: {err} of {scale}");
            }
        };
        check(a.clone(), b.clone(), "broadcast weight", true);
        check(at, b.clone(), "strided left operand", false);

        // [1, 4, 24, 256] x [2, 4, 256, 40]: a view with the parts' stride, as split-K passes.
        let a4 = a.reshape([1, 24, 4, 256]).swap_dims(1, 2);
        let b4 = b.reshape([2, 4, 256, 40]);
        let tuned = a4.clone().matmul(b4.clone());
        let fixed = fixed_matmul(a4.clone(), b4.clone());
        assert_eq!(fixed.dims(), [2, 4, 24, 40]);
        let abs_sum = max_abs(a4.abs().matmul(b4.abs()));
        let err = max_abs(fixed - tuned);
        assert!(err <= 1e-5 * abs_sum, "four axes: {err} of {abs_sum}");
    }

    #[test]
    fn fixed_equals_tuned_on_the_cpu() {
        fixed_equals_tuned_on(&crate::device::cpu());
    }

    #[test]
    fn fixed_equals_tuned_on_the_gpu() {
        let Some(device) = crate::device::test_gpu() else {
            return;
        };
        fixed_equals_tuned_on(&device);
    }
}
