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
//!
//! [`unit_matmul`] runs any one of cubek's unit routines, the family the browser's fixed choice
//! belongs to (one unit per output tile, no cmma, and no subgroup operation, which the browser
//! lacks: none in their WGSL in cubecl's compilation log on lavapipe, where the plane routines
//! use them), so that the bench can also time the ones a tab could choose instead: what a
//! choice by timing at load would gain.

use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::cubecl::dtype_to_storage_type;
use burn::backend::tensor::FloatTensor;
use burn::backend::{Autodiff, Backend, Dispatch, TensorMetadata, backend_extension};
use burn::tensor::{Shape, Tensor};
use burn_cubecl::CubeBackend;
use burn_cubecl::kernel::matmul::{MatmulStrategy, init_matmul_output, matmul};
use burn_cubecl::kernel::untile;
use cubek::matmul::definition::{MatmulElems, MatmulGlobalElems};
use cubek::matmul::multi_level::Strategy as Routine;
use cubek::matmul::multi_level::routines::TileSizeSelection;
use cubek::matmul::multi_level::routines::batch::double_unit::DoubleUnitSelectionArgs;
use cubek::matmul::multi_level::routines::batch::simple_unit::SimpleUnitSelectionArgs;
use cubek::matmul::strategy::Strategy;
use cubek::std::InputBinding;
use std::sync::atomic::{AtomicUsize, Ordering};

/// One of cubek's unit matmul routines: a unit computes a tile of the output from operand tiles
/// staged in workgroup memory, single or double buffered, with the largest or the smallest
/// tile its selector allows. [`UnitRoutine::SimpleLargest`] is the browser's fixed choice.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UnitRoutine {
    SimpleLargest,
    SimpleSmallest,
    DoubleLargest,
    DoubleSmallest,
}

impl UnitRoutine {
    pub const ALL: [Self; 4] = [
        Self::SimpleLargest,
        Self::SimpleSmallest,
        Self::DoubleLargest,
        Self::DoubleSmallest,
    ];

    /// Its place in [`Self::ALL`], which lists the variants in order.
    pub fn index(self) -> usize {
        self as usize
    }

    /// How the bench names it (no commas: its `--only` splits on them).
    pub fn name(self) -> &'static str {
        match self {
            Self::SimpleLargest => "simple unit routine with the largest tiles",
            Self::SimpleSmallest => "simple unit routine with the smallest tiles",
            Self::DoubleLargest => "double-buffered unit routine with the largest tiles",
            Self::DoubleSmallest => "double-buffered unit routine with the smallest tiles",
        }
    }

    fn strategy(self) -> Strategy {
        use cubek::matmul::routine::BlueprintStrategy::Inferred;
        let tile = |largest: bool| {
            if largest {
                TileSizeSelection::MaxTileSize
            } else {
                TileSizeSelection::MinTileSize
            }
        };
        let routine = match self {
            Self::SimpleLargest | Self::SimpleSmallest => {
                Routine::SimpleUnit(Inferred(SimpleUnitSelectionArgs {
                    tile_size: tile(self == Self::SimpleLargest),
                }))
            }
            Self::DoubleLargest | Self::DoubleSmallest => {
                Routine::DoubleUnit(Inferred(DoubleUnitSelectionArgs {
                    tile_size: tile(self == Self::DoubleLargest),
                }))
            }
        };
        Strategy::MultiLevel(routine)
    }
}

/// `a x b` for `a` `[.., m, k]` and `b` `[.., k, n]` (batch axes broadcast as in burn's
/// `matmul`) by the kernel burn runs in the browser. On burn's CPU backend and under autodiff,
/// burn's own product.
pub fn fixed_matmul<const D: usize>(a: Tensor<D>, b: Tensor<D>) -> Tensor<D> {
    Tensor::from_dispatch(Dispatch::fixed_matmul(a.into_dispatch(), b.into_dispatch()))
}

/// `a x b` as [`fixed_matmul`] takes them, by `routine`; where the routine refuses the operands
/// (a layout or size it cannot tile), by burn's own product, counted in [`unit_refusals`]. On
/// burn's CPU backend and under autodiff, burn's own product.
pub fn unit_matmul<const D: usize>(a: Tensor<D>, b: Tensor<D>, routine: UnitRoutine) -> Tensor<D> {
    Tensor::from_dispatch(Dispatch::unit_matmul(
        a.into_dispatch(),
        b.into_dispatch(),
        routine.index(),
    ))
}

static UNIT_REFUSALS: AtomicUsize = AtomicUsize::new(0);

/// How many products a unit routine refused since the program started (each ran as burn's own
/// instead), so that a row timed "by" a routine can be seen not to have been.
pub fn unit_refusals() -> usize {
    UNIT_REFUSALS.load(Ordering::Relaxed)
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

    /// See [`unit_matmul`]; `routine` indexes [`UnitRoutine::ALL`]. The default is the
    /// backend's own product.
    #[fusion(dtype = a, shape = product_shape(a, b))]
    fn unit_matmul(
        a: FloatTensor<Self>,
        b: FloatTensor<Self>,
        _routine: usize,
    ) -> FloatTensor<Self> {
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

    fn unit_matmul(
        a: FloatTensor<Self>,
        b: FloatTensor<Self>,
        routine: usize,
    ) -> FloatTensor<Self> {
        let routine = UnitRoutine::ALL[routine.min(UnitRoutine::ALL.len() - 1)];
        // An operand stored in the tiled cmma routine's tiles is laid out plainly first, as
        // burn's own kernels take it.
        let (a, b) = (untile(a), untile(b));
        let dtype = a.dtype();
        let out = init_matmul_output(&a, &b, dtype);
        let storage = dtype_to_storage_type(dtype);
        let mut dtypes = MatmulElems::from_globals(&MatmulGlobalElems {
            lhs: storage,
            rhs: storage,
            out: storage,
        });
        let launched = cubek::matmul::launch::launch_ref(
            &routine.strategy(),
            &out.client,
            InputBinding::new(a.clone().binding(), storage),
            InputBinding::new(b.clone().binding(), storage),
            out.clone().binding(),
            &mut dtypes,
        );
        match launched {
            Ok(()) => out,
            Err(e) => {
                UNIT_REFUSALS.fetch_add(1, Ordering::Relaxed);
                log::warn!(
                    "{} refused a product ({e:?}); burn's own ran",
                    routine.name()
                );
                <Self as burn::backend::ops::FloatTensorOps<Self>>::float_matmul(a, b)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{max_abs, wave};
    use burn::tensor::{DType, Device};

    /// The fixed kernel's and each unit routine's product against burn's (autotune's pick
    /// natively) on `device`, with a broadcast batch (a convolution's weight), a strided operand
    /// (the pull-back's transposed weight) and four axes (split-K's parts), in f32 and in f16.
    fn fixed_equals_tuned_on(device: &Device) {
        let a = wave([1, 24, 1024], 0.37, [1.0, 0.1], device);
        let b = wave([2, 1024, 40], 0.11, [1.0, -0.2], device);
        let at = wave([1, 1024, 24], 0.53, [1.0, 0.0], device).swap_dims(1, 2);
        // None: the browser's fixed kernel.
        let kernels = std::iter::once(None).chain(UnitRoutine::ALL.map(Some));
        for routine in kernels {
            let kernel = routine.map_or("the browser's kernel", UnitRoutine::name);
            let product = |a, b| match routine {
                None => fixed_matmul::<4>(a, b),
                Some(r) => unit_matmul(a, b, r),
            };
            let check = |a: Tensor<4>, b: Tensor<4>, what: &str, f16: bool| {
                let tuned = a.clone().matmul(b.clone());
                let got = product(a.clone(), b.clone());
                assert_eq!(got.dims(), tuned.dims(), "{kernel}, {what}");
                // Two f32 sums of 1024 (or 256) terms, perhaps in different orders: each
                // within k·eps·Σ|a||b| (6e-5 of it) at worst, about √k·eps (4e-6) in practice;
                // a wrong layout or batch is off by the size of the result itself.
                let abs_sum = max_abs(a.clone().abs().matmul(b.clone().abs()));
                let err = max_abs(got - tuned.clone());
                assert!(
                    err <= 1e-5 * abs_sum,
                    "{kernel}, {what}: {err} of {abs_sum}"
                );
                // In f16 both round the inputs and the output alike and may sum in different
                // orders and precisions: within the 2e-2 of the result's largest value that
                // the parity tests allow an f16 product. Only where the result is not a
                // cancellation (the strided case's is 1e-3 of Σ|a||b|), or no bound would be
                // both safe and tight.
                if f16 {
                    let (a16, b16) = (a.cast(DType::F16), b.cast(DType::F16));
                    let tuned16 = a16.clone().matmul(b16.clone()).cast(DType::F32);
                    let got16 = product(a16, b16).cast(DType::F32);
                    let scale = max_abs(tuned);
                    let err = max_abs(got16 - tuned16);
                    assert!(
                        err <= 2e-2 * scale,
                        "{kernel}, {what} in f16: {err} of {scale}"
                    );
                }
            };
            check(
                a.clone().unsqueeze(),
                b.clone().unsqueeze(),
                "broadcast weight",
                true,
            );
            check(
                at.clone().unsqueeze(),
                b.clone().unsqueeze(),
                "strided left operand",
                false,
            );
            // [1, 4, 24, 256] x [2, 4, 256, 40]: a view with the parts' stride, as split-K
            // passes.
            let a4 = a.clone().reshape([1, 24, 4, 256]).swap_dims(1, 2);
            let b4 = b.clone().reshape([2, 4, 256, 40]);
            check(a4, b4, "four axes", false);
        }
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
        let refused = unit_refusals();
        fixed_equals_tuned_on(&device);
        // Every routine ran as itself, not as burn's product in its place.
        assert_eq!(unit_refusals(), refused);
    }
}
