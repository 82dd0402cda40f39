use super::*;
use crate::model::{layer_wave as wave, max_abs};

#[test]
fn gemm_convolution_equals_burns() {
    // f32 sums of 45 products of values under 1 in two orders: far under 1e-5.
    gemm_equals_burns_on(Device::flex(), 1e-5);
}

#[test]
fn gemm_convolution_equals_burns_on_the_gpu() {
    // The bands are written into the output in place on a GPU (cubecl's slice assignment
    // of a tensor nothing else holds), which the CPU backend does not show. burn's
    // direct kernel sums in another order and may fuse multiply-adds: 1e-4.
    let Some(device) = crate::device::test_gpu() else {
        return;
    };
    gemm_equals_burns_on(device, 1e-4);
}

fn gemm_equals_burns_on(device: Device, tolerance: f32) {
    let x = wave([2, 5, 7, 6], 0.3, &device);
    let bias = wave([4], 2.0, &device);
    for (k, p, s) in [(3, 1, 1), (1, 0, 1), (3, 0, 1), (3, 1, 2)] {
        let weight = wave([4, 5, k, k], 1.1, &device);
        let direct = conv2d(
            x.clone(),
            weight.clone(),
            Some(bias.clone()),
            ConvOptions::new([s, s], [p, p], [1, 1], 1),
        );
        let w = weight.permute([0, 2, 3, 1]).reshape([1, 4, k * k * 5]);
        // Whole, then one output row per band (the band boundaries must not show).
        for band_bytes in [usize::MAX, 1] {
            let bias = bias.clone().reshape([1, 4, 1]);
            let gemm = gemm_in_bands(
                x.clone(),
                &w,
                Some(&bias),
                None,
                [k, p, s],
                Windows::Forward,
                band_bytes,
                ProductSplit::default(),
            );
            assert_eq!(gemm.dims(), direct.dims());
            let diff = max_abs(gemm - direct.clone());
            assert!(
                diff < tolerance,
                "k={k} p={p} s={s} band={band_bytes}: {diff}"
            );
        }
    }
}

#[test]
fn split_products_leave_a_convolution_and_its_pull_back_unchanged() {
    split_convolution_on(Device::flex());
}

#[test]
fn split_products_leave_a_convolution_and_its_pull_back_unchanged_on_the_gpu() {
    let Some(device) = crate::device::test_gpu() else {
        return;
    };
    split_convolution_on(device);
}

fn split_convolution_on(device: Device) {
    // 64 channels in and out: both products' shared axes are 576 long, cut in 2 parts.
    let x = wave([2, 64, 5, 4], 0.3, &device);
    let g = wave([2, 64, 5, 4], 2.0, &device);
    let weight = wave([64, 64, 3, 3], 1.1, &device).mul_scalar(0.1);
    let plain = Conv2d::new(
        weight,
        Some(wave([64], 0.7, &device)),
        ConvSpec::k3(64, 64),
        true,
    );
    assert!(matches!(plain.kernel, Kernel::Gemm { .. }));
    let (whole, split) = (ProductSplit::default(), ProductSplit::below(usize::MAX));
    assert_eq!(split.parts(2 * 64 * 20, 576), 2);
    // f32 sums of 576 products under 0.1 in two orders.
    let forward = |s| plain.forward_inner(x.clone(), None, s);
    let diff = max_abs(forward(split) - forward(whole));
    assert!(diff < 1e-4, "forward: {diff}");
    let pull = |s| {
        plain
            .pull_back_split(g.clone(), s)
            .expect("a stride-1 pull-back")
    };
    let diff = max_abs(pull(split) - pull(whole));
    assert!(diff < 1e-4, "pull-back: {diff}");
}

#[test]
fn hand_written_convolution_pull_back_equals_autodiff() {
    // The lean guidance pulls every stride-1 convolution back by hand, in both layouts.
    let device = Device::flex();
    let x = wave([1, 5, 7, 6], 0.3, &device);
    let bias = wave([4], 2.0, &device);
    for (k, p) in [(3, 1), (1, 0), (3, 0), (5, 2)] {
        let weight = wave([4, 5, k, k], 1.1, &device);
        let (oh, ow) = (7 + 2 * p + 1 - k, 6 + 2 * p + 1 - k);
        // Two cotangent rows against a one-row input, as the guidance pulls back.
        let g = wave([2, 4, oh, ow], 3.0, &device);
        let direct = Conv2d {
            kernel: Kernel::Direct {
                weight: weight.clone(),
                bias: Some(bias.clone()),
                options: ConvOptions::new([1, 1], [p, p], [1, 1], 1),
            },
        };
        let leaf = x.clone().repeat_dim(0, 2).autodiff().require_grad();
        let grads = (direct.forward(leaf.clone()) * g.clone()).sum().backward();
        let want = leaf.grad(&grads).expect("the input's gradient");
        let gemm = Conv2d {
            kernel: Kernel::Gemm {
                weight: weight
                    .clone()
                    .permute([0, 2, 3, 1])
                    .reshape([1, 4, k * k * 5]),
                bias: Some(bias.clone().reshape([1, 4, 1])),
                kernel: k,
                padding: p,
                stride: 1,
            },
        };
        for (name, conv) in [("direct", direct), ("gemm", gemm)] {
            assert!(conv.has_pull_back());
            let got = conv.pull_back(g.clone()).expect("a stride-1 pull-back");
            assert_eq!(got.dims(), want.dims(), "{name} k={k} p={p}");
            // The same sums of at most 4 x 25 products under 1, regrouped.
            let diff = max_abs(got - want.clone());
            assert!(diff < 1e-5, "{name} k={k} p={p}: {diff}");
        }
    }
    let strided = Conv2d {
        kernel: Kernel::Direct {
            weight: wave([4, 5, 3, 3], 1.1, &device),
            bias: None,
            options: ConvOptions::new([2, 2], [1, 1], [1, 1], 1),
        },
    };
    let strided_gemm = Conv2d::new(
        wave([4, 5, 3, 3], 1.1, &device),
        None,
        ConvSpec {
            stride: 2,
            ..ConvSpec::k3(5, 4)
        },
        true,
    );
    for strided in [strided, strided_gemm] {
        assert!(!strided.has_pull_back());
        assert!(
            strided
                .pull_back(wave([1, 4, 4, 3], 0.0, &device))
                .is_none()
        );
    }
}

#[test]
fn gemm_convolution_gradient_equals_burns() {
    // The guidance differentiates through every convolution to its input, the
    // downsamplers' stride 2 included (their pull-back is autodiff's).
    let device = Device::flex();
    let x = wave([2, 5, 7, 6], 0.3, &device);
    let weight = wave([4, 5, 3, 3], 1.1, &device);
    for s in [1, 2] {
        let g = wave([2, 4, (7 - 1) / s + 1, (6 - 1) / s + 1], 3.0, &device);
        let grad = |gemm: bool| {
            let leaf = x.clone().autodiff().require_grad();
            let y = if gemm {
                let w = weight.clone().permute([0, 2, 3, 1]).reshape([1, 4, 45]);
                gemm_in_bands(
                    leaf.clone(),
                    &w,
                    None,
                    None,
                    [3, 1, s],
                    Windows::Forward,
                    1,
                    ProductSplit::default(),
                )
            } else {
                conv2d(
                    leaf.clone(),
                    weight.clone(),
                    None,
                    ConvOptions::new([s, s], [1, 1], [1, 1], 1),
                )
            };
            let grads = (y * g.clone()).sum().backward();
            leaf.grad(&grads).expect("the input's gradient")
        };
        let diff = max_abs(grad(true) - grad(false));
        assert!(diff < 1e-5, "stride {s}: {diff}");
    }
}
