//! The im2col step of a convolution: every `k x k` window of an image, zero where it
//! reaches past the image's edge, laid out `[b, (dy, dx, c), rows * ow]` for one matrix product
//! with a `[1, out, (dy, dx, c)]` weight; or, for the convolution's pull-back, laid out
//! `[b, (c, dy, dx), rows * ow]` with the window flipped, so that the forward weight itself,
//! seen as `[1, (c, dy, dx), in]` and transposed, is the pull-back's weight: no flipped copy
//! of the weight is made per call.
//!
//! On a GPU it is one kernel of our own (cubecl, compiled to WGSL in the browser like burn's
//! kernels), which reads the image where it stands and writes the windows. Composed of burn's
//! ops it took three launches and a padded copy of the image: a zero fill and a slice
//! assignment for the padding, then the window copy; burn-fusion fuses none of them, since it
//! plans every slice, pad and reshape as a segment of its own. The composition stays for burn's
//! CPU backend and for tensors that autodiff tracks (the tape guidance), where it is
//! differentiable as it is.

use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::cubecl::dtype_to_storage_type;
use burn::backend::tensor::FloatTensor;
use burn::backend::{Autodiff, Backend, Dispatch, TensorMetadata, backend_extension};
use burn::tensor::ops::PadMode;
use burn::tensor::{Shape, Slice, Tensor};
use burn_cubecl::CubeBackend;
use burn_cubecl::cubecl::calculate_cube_count_elemwise;
use burn_cubecl::cubecl::prelude::CubeDim;
use burn_cubecl::kernel::untile;
use burn_cubecl::ops::numeric::empty_device_contiguous_dtype;

/// The windows of output rows `first_row..first_row + rows` of a `kernel x kernel` convolution
/// of `x` `[b, c, h, w]` with `padding` zeros on every side and the given `stride`:
/// `[b, kernel * kernel * c, rows * ow]`, ordered (dy, dx, c) along the second axis. With
/// `adjoint`, ordered (c, dy, dx) and each window flipped: entry (c, dy, dx) holds what
/// (c, k-1-dy, k-1-dx) holds otherwise.
pub fn conv_windows(
    x: Tensor<4>,
    kernel: usize,
    padding: usize,
    stride: usize,
    first_row: usize,
    rows: usize,
    adjoint: bool,
) -> Tensor<3> {
    Tensor::from_dispatch(Dispatch::conv_windows(
        x.into_dispatch(),
        kernel,
        padding,
        stride,
        first_row,
        rows,
        adjoint,
    ))
}

fn windows_shape(
    x: &Shape,
    kernel: &usize,
    padding: &usize,
    stride: &usize,
    _first_row: &usize,
    rows: &usize,
    _adjoint: &bool,
) -> Shape {
    let ow = (x[3] + 2 * padding - kernel) / stride + 1;
    Shape::new([x[0], kernel * kernel * x[1], rows * ow])
}

#[backend_extension(Cube, Fusion, Flex: cfg(not(target_family = "wasm")), Autodiff)]
pub trait WindowOps: Backend {
    /// See [`conv_windows`]. The default composes burn's ops; the GPU runs one kernel.
    #[fusion(dtype = x, shape = windows_shape(x, kernel, padding, stride, first_row, rows, adjoint))]
    fn conv_windows(
        x: FloatTensor<Self>,
        kernel: usize,
        padding: usize,
        stride: usize,
        first_row: usize,
        rows: usize,
        adjoint: bool,
    ) -> FloatTensor<Self> {
        let shape = x.shape();
        let (b, c, h, w) = (shape[0], shape[1], shape[2], shape[3]);
        let ow = (w + 2 * padding - kernel) / stride + 1;
        // The input rows these output rows read, padded here rather than the whole input
        // first: a padded copy of a VAE activation at 512 px would pass WebGPU's 128 MiB
        // binding size, which the activation itself just fits.
        let (lo, hi) = (
            (first_row * stride) as isize - padding as isize,
            (first_row + rows - 1) * stride + kernel,
        );
        let top = (-lo).max(0) as usize;
        let bottom = hi.saturating_sub(h + padding);
        let (first, last) = (lo.max(0) as usize, (hi - padding).min(h));
        let x = Self::float_slice(
            x,
            &[
                Slice::from(0..b),
                Slice::from(0..c),
                Slice::from(first..last),
                Slice::from(0..w),
            ],
        );
        let x = if padding > 0 {
            Self::float_pad(
                x,
                &[(0, 0), (0, 0), (top, bottom), (padding, padding)],
                PadMode::Constant(0.0),
            )
        } else {
            x
        };
        // Every window as a strided view `[b, c, rows, ow, dy, dx]`, laid out like the
        // weight by one copy.
        let x = Self::float_unfold(x, 2, kernel, stride);
        let x = Self::float_unfold(x, 3, kernel, stride);
        let x = if adjoint {
            Self::float_permute(Self::float_flip(x, &[4, 5]), &[0, 1, 4, 5, 2, 3])
        } else {
            Self::float_permute(x, &[0, 4, 5, 1, 2, 3])
        };
        Self::float_reshape(x, Shape::new([b, kernel * kernel * c, rows * ow]))
    }
}

#[cfg(not(target_family = "wasm"))]
impl WindowOps for burn::backend::Flex {}

impl<B: Backend + WindowOps, C: CheckpointStrategy> WindowOps for Autodiff<B, C> {}

impl WindowOps for CubeBackend {
    fn conv_windows(
        x: FloatTensor<Self>,
        kernel: usize,
        padding: usize,
        stride: usize,
        first_row: usize,
        rows: usize,
        adjoint: bool,
    ) -> FloatTensor<Self> {
        let x = untile(x);
        let shape = windows_shape(
            x.meta.shape(),
            &kernel,
            &padding,
            &stride,
            &first_row,
            &rows,
            &adjoint,
        );
        let ow = shape[2] / rows.max(1);
        let output = empty_device_contiguous_dtype(
            x.client.clone(),
            x.device.clone(),
            shape.clone(),
            x.dtype,
        );
        let units = shape.num_elements();
        let cube_dim = CubeDim::new(&x.client, units);
        let cube_count = calculate_cube_count_elemwise(&x.client, units, cube_dim);
        let dtype = dtype_to_storage_type(x.dtype);
        kernel::windows_kernel::launch(
            &output.client,
            cube_count,
            cube_dim,
            x.into_tensor_arg(),
            output.clone().into_tensor_arg(),
            kernel,
            padding,
            stride,
            first_row,
            ow,
            adjoint,
            dtype,
        );
        output
    }
}

mod kernel {
    use burn_cubecl::cubecl;
    use cubecl::prelude::*;

    /// One thread per element of the windows: it finds the image element its window position
    /// reads, or writes zero where that falls in the padding. Neighbouring threads read
    /// neighbouring pixels of one row, so the reads coalesce as the writes do.
    #[cube(launch)]
    pub(super) fn windows_kernel<E: Numeric>(
        input: &Tensor<E>,
        output: &mut Tensor<E>,
        kernel: usize,
        padding: usize,
        stride: usize,
        first_row: usize,
        ow: usize,
        #[comptime] adjoint: bool,
        #[define(E)] _dtype: ElemType,
    ) {
        if ABSOLUTE_POS >= output.len() {
            terminate!();
        }
        let columns = output.shape(2);
        let depth = output.shape(1);
        let channels = input.shape(1);
        let column = ABSOLUTE_POS % columns;
        let rest = ABSOLUTE_POS / columns;
        let position = rest % depth;
        let batch = rest / depth;
        let taps = kernel * kernel;
        let mut channel = position % channels;
        let mut offset = position / channels;
        if adjoint {
            channel = position / taps;
            offset = taps - 1 - position % taps;
        }
        let (dy, dx) = (offset / kernel, offset % kernel);
        // Row and column in the padded image; unsigned, so the padding is subtracted only after
        // the comparison that says the position is inside the image.
        let y = (first_row + column / ow) * stride + dy;
        let x = (column % ow) * stride + dx;
        let mut value = E::from_int(0);
        if y >= padding
            && x >= padding
            && y < input.shape(2) + padding
            && x < input.shape(3) + padding
        {
            value = input[batch * input.stride(0)
                + channel * input.stride(1)
                + (y - padding) * input.stride(2)
                + (x - padding) * input.stride(3)];
        }
        output[ABSOLUTE_POS] = value;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::{DType, Device};

    fn wave(shape: [usize; 4], device: &Device) -> Tensor<4> {
        let n: usize = shape.iter().product();
        Tensor::<1, burn::tensor::Int>::arange(0..n as i64, device)
            .float()
            .mul_scalar(0.37)
            .sin()
            .reshape(shape)
    }

    /// The GPU kernel against the composition of burn's ops (what an autodiff-tracked tensor
    /// takes) on the same device, in f32 and f16, at every kind of band the convolution cuts:
    /// all rows, the first rows (top padding), middle rows and the last rows (bottom padding),
    /// for the 3x3 forward (padding 1), its pull-back (padding 2), no padding, a 1x1 and the
    /// downsamplers' stride 2. The
    /// values are copied, not computed, so they must be equal, not close. Both layouts; the
    /// input is a transposed view, so the kernel's strided reads are tested too.
    #[test]
    fn kernel_equals_composed_windows() {
        let Some(device) = crate::device::test_gpu() else {
            return;
        };
        for dtype in [DType::F32, DType::F16] {
            let x = wave([2, 3, 5, 7], &device).swap_dims(2, 3).cast(dtype);
            for (kernel, padding, stride) in [(3, 1, 1), (3, 2, 1), (3, 0, 1), (1, 0, 1), (3, 1, 2)]
            {
                let oh = (7 + 2 * padding - kernel) / stride + 1;
                for (first_row, rows) in [(0, oh), (0, 2), (1, 2), (oh - 2, 2)] {
                    for adjoint in [false, true] {
                        let at = |x: Tensor<4>| {
                            conv_windows(x, kernel, padding, stride, first_row, rows, adjoint)
                        };
                        let ours = at(x.clone());
                        let composed = at(x.clone().autodiff().require_grad()).without_autodiff();
                        assert_eq!(ours.dims(), composed.dims());
                        assert_eq!(ours.dtype(), dtype);
                        ours.into_data().assert_eq(&composed.into_data(), true);
                    }
                }
            }
        }
    }
}
