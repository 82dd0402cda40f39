//! Rows of single operations at SD 1.5's shapes: the convolutions, the attention cores and
//! their pull-backs, and the UNet's matrix products whole and split.

use anyhow::Result;
use burn::tensor::{Device, Tensor};
use dragonedit::model::flash_attention::runs_as_kernels;

use super::measure::{Plan, Row, measure, median};
use crate::run::read_values;

/// Single operations at SD 1.5's shapes for this resolution, batch 2 (CFG): the two ways of
/// convolving and the attention core, to show what the UNet's time is made of.
pub(super) fn op_rows(
    plan: Plan,
    device: &Device,
    dtype: burn::tensor::DType,
    (lh, lw): (usize, usize),
    read: impl Fn(Tensor<4>) -> Result<()>,
) -> Result<Vec<Row>> {
    use burn::tensor::{DType, Distribution};
    use dragonedit::model::attention::{AttentionPlan, attend_fused};
    use dragonedit::model::conv::{Conv2d, ConvSpec};

    let names = [
        format!("op: conv3x3 320->320, [2,320,{lh},{lw}], burn's conv2d"),
        format!("op: conv3x3 320->320, [2,320,{lh},{lw}], im2col + matmul"),
        format!("op: attention core, [2,8,{},40], score chunks", lh * lw),
        format!("op: attention core, [2,8,{},40], burn's fused op", lh * lw),
        format!(
            "op: attention core, [2,8,{},40], flash kernel of our own",
            lh * lw
        ),
        format!(
            "op: attention pull-back, 2 rows of [1,8,{},40], score chunks",
            lh * lw
        ),
        format!(
            "op: attention pull-back, 2 rows of [1,8,{},40], kernels of our own",
            lh * lw
        ),
    ];
    if !names.iter().any(|n| plan.selects(n)) {
        return Ok(Vec::new());
    }
    let random = |shape: [usize; 4]| {
        Tensor::<4>::random(shape, Distribution::Normal(0.0, 1.0), device).cast(dtype)
    };
    let x = random([2, 320, lh, lw]);
    let w = random([320, 320, 3, 3]).mul_scalar(0.02);
    let direct = Conv2d::new(w.clone(), None, ConvSpec::k3(320, 320), false);
    let gemm = Conv2d::new(w, None, ConvSpec::k3(320, 320), true);
    let (q, k, v) = (
        random([2, 8, lh * lw, 40]),
        random([2, 8, lh * lw, 40]),
        random([2, 8, lh * lw, 40]),
    );
    let mut rows = Vec::new();
    rows.extend(measure(&names[0], plan, device, || {
        read(direct.forward(x.clone()))
    })?);
    rows.extend(measure(&names[1], plan, device, || {
        read(gemm.forward(x.clone()))
    })?);
    let attention = AttentionPlan::default();
    rows.extend(measure(&names[2], plan, device, || {
        read(attention.attend_chunked(q.clone(), k.clone(), v.clone(), false))
    })?);
    rows.extend(measure(&names[3], plan, device, || {
        read(attend_fused(q.clone(), k.clone(), v.clone()))
    })?);
    // The fast paths against the plain ones on this device (parity tests run on lavapipe only).
    let relative = |a: Tensor<4>, b: Tensor<4>| -> Result<f32> {
        let diff = read_values((a - b.clone()).cast(DType::F32).powi_scalar(2).sum())?.1;
        let norm = read_values(b.cast(DType::F32).powi_scalar(2).sum())?.1;
        Ok((diff[0] / norm[0].max(f32::MIN_POSITIVE)).sqrt())
    };
    eprintln!(
        "bench: check: im2col + matmul against burn's conv2d, relative error {:.2e}; \
         fused attention against score chunks, {:.2e}",
        relative(gemm.forward(x.clone()), direct.forward(x))?,
        relative(
            attend_fused(q.clone(), k.clone(), v.clone()),
            attention.attend_chunked(q.clone(), k.clone(), v.clone(), false)
        )?,
    );
    if runs_as_kernels(device, 40) {
        rows.extend(kernel_rows(&names[4..], plan, device, [q, k, v], &read)?);
    }
    Ok(rows)
}

/// The UNet's matrix products at each of its four resolutions, whole (by the tuned kernels, by
/// the browser's fixed one and by the other unit routines a browser could run) and cut into 2,
/// 4 and 8 parts along their shared axis (split-K): a 3x3 convolution's im2col product (`[1, out, 9 ·
/// in] x [2, 9 · in, h · w]`) and the feed-forward's second linear layer (`[2, h · w, 4 · c] x
/// [1, 4 · c, c]`), batch 2: what `--split-outputs` should be on this device. 64 rows, so they
/// run only when `--only` names them.
pub(super) fn product_rows(
    plan: Plan,
    device: &Device,
    dtype: burn::tensor::DType,
    (lh, lw): (usize, usize),
    read: impl Fn(Tensor<4>) -> Result<()>,
) -> Result<Vec<Row>> {
    use burn::tensor::Distribution;
    use dragonedit::model::fixed_product::{UnitRoutine, unit_refusals};
    use dragonedit::model::products::{ProductKernel, matmul_in_parts};

    if plan.only.is_none() {
        return Ok(Vec::new());
    }
    let random = |shape: [usize; 3]| {
        Tensor::<3>::random(shape, Distribution::Normal(0.0, 1.0), device).cast(dtype)
    };
    let mut rows = Vec::new();
    for (level, c) in [320, 640, 1280, 1280].into_iter().enumerate() {
        let (h, w) = (lh >> level, lw >> level);
        let n = h * w;
        if n == 0 {
            break;
        }
        let products = [
            (
                format!("conv3x3 {c}->{c} at {h}x{w}"),
                [1, c, 9 * c],
                [2, 9 * c, n],
            ),
            (
                format!("feed-forward out {}->{c} at {h}x{w}", 4 * c),
                [2, n, 4 * c],
                [1, 4 * c, c],
            ),
        ];
        for (what, a_shape, b_shape) in products {
            let [_, rows_a, inner] = a_shape;
            let cols_b = b_shape[2];
            // Batch 2, a multiply-add two operations.
            let flops = 4.0 * (rows_a * inner * cols_b) as f64;
            // The whole product by the tuned kernels, by the browser's fixed one and by the
            // other unit routines a browser could run, whatever `--products` says; the parts
            // by the kernel it names.
            let whole = [ProductKernel::Tuned, ProductKernel::Browser]
                .into_iter()
                .chain(
                    UnitRoutine::ALL
                        .into_iter()
                        .filter(|r| *r != UnitRoutine::SimpleLargest)
                        .map(ProductKernel::Unit),
                )
                .map(|kernel| (kernel, 1));
            let split = [2, 4, 8].map(|parts| (ProductKernel::current(), parts));
            for (kernel, parts) in whole.chain(split) {
                // No commas: `--only` splits on them.
                let name = format!(
                    "op: product {rows_a}x{inner} by {inner}x{cols_b}, batch 2 ({what}), {}",
                    match (parts, kernel) {
                        (1, ProductKernel::Tuned) => "whole".to_string(),
                        (1, ProductKernel::Browser) => "whole by the browser's kernel".to_string(),
                        (1, ProductKernel::Unit(r)) => format!("whole by the {}", r.name()),
                        (p, _) => format!("{p} parts"),
                    }
                );
                if !plan.selects(&name) {
                    continue;
                }
                let (a, b) = (random(a_shape), random(b_shape));
                let refused = unit_refusals();
                let row = measure(&name, plan, device, || {
                    let product = match parts {
                        1 => kernel.matmul(a.clone(), b.clone()),
                        _ => matmul_in_parts(a.clone(), b.clone(), parts),
                    };
                    read(product.unsqueeze())
                })?;
                if let Some(r) = &row {
                    eprintln!(
                        "bench: {name}: {:.2} TFLOP/s{}",
                        flops / (median(&r.times_ms) * 1e-3) / 1e12,
                        match unit_refusals() - refused {
                            0 => String::new(),
                            n => format!(" ({n} products refused by the routine: burn's ran)"),
                        }
                    );
                }
                rows.extend(row);
            }
        }
    }
    Ok(rows)
}

/// The attention kernels of our own against score chunks, forward and pull-back, with the
/// guidance's two cotangent rows per kept row, as `op_rows` lays out its attention inputs.
fn kernel_rows(
    names: &[String],
    plan: Plan,
    device: &Device,
    [q, k, v]: [Tensor<4>; 3],
    read: &impl Fn(Tensor<4>) -> Result<()>,
) -> Result<Vec<Row>> {
    use dragonedit::model::attention::AttentionPlan;
    use dragonedit::model::flash_attention::{attention_pull_back, flash_attention};

    let heads = q.dims()[1];
    let [qt, kt, vt] = [&q, &k, &v].map(tokens_of);
    let attention = AttentionPlan::default();
    let mut rows = Vec::new();
    rows.extend(measure(&names[0], plan, device, || {
        read(flash_attention(qt.clone(), kt.clone(), vt.clone(), heads).unsqueeze())
    })?);
    // One kept row (the lean guidance's), two cotangent rows (its two energies).
    let one = |t: &Tensor<4>| t.clone().narrow(0, 0, 1);
    let (q1, k1, v1) = (one(&q), one(&k), one(&v));
    let o1 = attention.attend_chunked(q1.clone(), k1.clone(), v1.clone(), false);
    let g = Tensor::cat(vec![o1.clone(), o1.clone().mul_scalar(-0.5)], 0);
    rows.extend(measure(&names[1], plan, device, || {
        let (gq, gk, gv) =
            attention.attend_pullback(q1.clone(), k1.clone(), v1.clone(), o1.clone(), g.clone());
        read((gq.sum() + gk.sum() + gv.sum()).reshape([1, 1, 1, 1]))
    })?);
    let [q1t, k1t, v1t, o1t, gt] = [&q1, &k1, &v1, &o1, &g].map(tokens_of);
    rows.extend(measure(&names[2], plan, device, || {
        let out = attention_pull_back(
            q1t.clone(),
            k1t.clone(),
            v1t.clone(),
            o1t.clone(),
            gt.clone(),
            heads,
            true,
        );
        read(out)
    })?);
    Ok(rows)
}

/// `[b, heads, n, d]` as tokens `[b, n, heads · d]`.
fn tokens_of(t: &Tensor<4>) -> Tensor<3> {
    let [b, heads, n, d] = t.dims();
    t.clone().swap_dims(1, 2).reshape([b, n, heads * d])
}
