//! Scaled dot-product attention computed in pieces small enough for WebGPU.
//!
//! Self-attention at a 64x64 latent has a 4096x4096 score matrix per head (64 MiB in f32, 512
//! MiB for 8 heads). WebGPU's default storage-binding limit is 128 MiB and burn never splits a
//! buffer itself (BURN.md §4), so scores are computed over groups of heads, and over blocks of
//! query rows when one head alone is too large, keeping every score buffer under a budget.

use burn::tensor::{Bool, Device, Tensor, activation::softmax};
use std::sync::atomic::{AtomicU8, Ordering};

/// Upper bound on any single attention score buffer. 64 MiB keeps a score chunk, its softmax
/// and the autodiff copies well under the 128 MiB WebGPU default binding size.
pub const DEFAULT_MAX_SCORE_BYTES: usize = 64 << 20;

/// How attention splits its work.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AttentionPlan {
    /// Largest score buffer allowed, in bytes.
    pub max_score_bytes: usize,
}

impl Default for AttentionPlan {
    fn default() -> Self {
        Self {
            max_score_bytes: DEFAULT_MAX_SCORE_BYTES,
        }
    }
}

/// How attention is computed where no gradient flows through it, for the whole process.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AttentionStrategy {
    /// The UNet's attention on a native GPU by burn's fused op or our flash kernel, whichever
    /// the first call of each shape times faster (`attention_choice`); in the browser by our
    /// kernel; the rest (the VAE's, the text encoder's, the CPU's) in score chunks. Not the
    /// fused op for the VAE's one 512-wide head: on an H200 its autotune had not finished the
    /// encode's warm-up in 80 s, where the chunks' warm-up, run and profile took 72 s.
    #[default]
    Auto,
    /// Score chunks under [`AttentionPlan::max_score_bytes`], softmax, matmul.
    Chunked,
    /// burn's fused attention op: natively its autotune picks a flash-attention kernel that never
    /// writes the scores. Not in the browser, where burn runs without autotune and the op
    /// materialises every score (BURN.md §4).
    Fused,
    /// The UNet's attention as our own flash kernel (`flash_attention`) on a GPU, the rest in
    /// score chunks. `Auto` takes it in the browser.
    Kernel,
}

static ATTENTION_STRATEGY: AtomicU8 = AtomicU8::new(0);

/// Sets how attention is computed from now on (the CLI's `--attention`).
pub fn set_attention_strategy(strategy: AttentionStrategy) {
    ATTENTION_STRATEGY.store(strategy as u8, Ordering::Relaxed);
}

/// The strategy [`set_attention_strategy`] last set.
fn strategy() -> AttentionStrategy {
    match ATTENTION_STRATEGY.load(Ordering::Relaxed) {
        1 => AttentionStrategy::Chunked,
        2 => AttentionStrategy::Fused,
        3 => AttentionStrategy::Kernel,
        _ => AttentionStrategy::Auto,
    }
}

/// Whether [`AttentionPlan::attend`] hands `q` (not causal, not under autodiff) to burn's fused
/// op: only with the strategy [`Fused`](AttentionStrategy::Fused). (With `Auto` the UNet's
/// timed choice calls [`attend_fused`] itself.)
pub fn uses_fused(q: &Tensor<4>) -> bool {
    // Under autodiff burn always differentiates the materialising fallback (BURN.md §4).
    !q.is_autodiff() && strategy() == AttentionStrategy::Fused
}

/// How the UNet's attention runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UnetAttention {
    /// Our own flash kernel (`flash_attention`).
    Kernel,
    /// [`AttentionPlan::attend`]: burn's fused op or score chunks, by the strategy.
    Composed,
    /// Whichever of our kernel and burn's fused op ([`attend_fused`]) the first call of its
    /// shape times faster on the device (`attention_choice::kernel_is_faster`).
    Timed,
}

/// How the UNet's attention, heads `head_width` wide, runs on `device`: our own flash kernel
/// where the device runs it (a GPU, not under autodiff) with the strategy
/// [`Kernel`](AttentionStrategy::Kernel) or `Auto` in the browser, where burn's fused op would
/// materialise every score; timed against burn's fused op with `Auto` on a native GPU.
pub fn unet_attention(device: &Device, head_width: usize) -> UnetAttention {
    if !crate::model::flash_attention::runs_as_kernels(device, head_width) {
        return UnetAttention::Composed;
    }
    match strategy() {
        AttentionStrategy::Kernel => UnetAttention::Kernel,
        AttentionStrategy::Auto if cfg!(target_family = "wasm") => UnetAttention::Kernel,
        AttentionStrategy::Auto => UnetAttention::Timed,
        AttentionStrategy::Chunked | AttentionStrategy::Fused => UnetAttention::Composed,
    }
}

/// If autotune picks the materialising fallback for a shape, the fused op holds every score of
/// a call at once: the heads of one call are grouped so that stays under this.
const FUSED_MAX_SCORE_BYTES: usize = 512 << 20;

/// How one attention call is cut up: `heads_per_chunk` (batch x head) rows at a time, and
/// `queries_per_chunk` query rows at a time within them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Chunking {
    pub heads_per_chunk: usize,
    pub queries_per_chunk: usize,
}

impl Chunking {
    /// Bytes of the largest score buffer this chunking creates.
    pub fn score_bytes(&self, keys: usize, elem_bytes: usize) -> usize {
        self.heads_per_chunk * self.queries_per_chunk * keys * elem_bytes
    }
}

/// softmax(q kᵀ / sqrt(d)) v through burn's fused attention op, over groups of heads (see
/// `FUSED_MAX_SCORE_BYTES`).
pub fn attend_fused(q: Tensor<4>, k: Tensor<4>, v: Tensor<4>) -> Tensor<4> {
    fused_in_groups(q, k, v, FUSED_MAX_SCORE_BYTES)
}

fn fused_in_groups(q: Tensor<4>, k: Tensor<4>, v: Tensor<4>, max_score_bytes: usize) -> Tensor<4> {
    use burn::tensor::module::attention;
    let [b, h, nq, _] = q.dims();
    let nk = k.dims()[2];
    let per_head = nq * nk * q.dtype().size();
    let heads = (max_score_bytes / per_head.max(1)).clamp(1, h);
    if heads == h {
        // The default scale (1/sqrt(d)) keeps burn on its flash path; a custom one would not.
        return attention(q, k, v, None, None, Default::default());
    }
    let groups: Vec<Tensor<4>> = (0..h)
        .step_by(heads)
        .map(|h0| {
            let n = heads.min(h - h0);
            attention(
                q.clone().narrow(1, h0, n),
                k.clone().narrow(1, h0, n),
                v.clone().narrow(1, h0, n),
                None,
                None,
                Default::default(),
            )
        })
        .collect();
    let out = Tensor::cat(groups, 1);
    debug_assert_eq!(out.dims()[..3], [b, h, nq]);
    out
}

impl AttentionPlan {
    /// Chooses the chunking for `batch_heads` heads of `queries` x `keys` scores.
    pub fn chunking(
        &self,
        batch_heads: usize,
        queries: usize,
        keys: usize,
        elem_bytes: usize,
    ) -> Chunking {
        let per_head = queries * keys * elem_bytes;
        if per_head <= self.max_score_bytes {
            let heads = (self.max_score_bytes / per_head.max(1)).clamp(1, batch_heads.max(1));
            return Chunking {
                heads_per_chunk: heads,
                queries_per_chunk: queries,
            };
        }
        let rows = (self.max_score_bytes / (keys * elem_bytes).max(1)).clamp(1, queries);
        Chunking {
            heads_per_chunk: 1,
            queries_per_chunk: rows,
        }
    }

    /// softmax(q kᵀ / sqrt(d)) v for `[B, H, N, D]` inputs. `causal` masks keys after the query
    /// position (CLIP's text encoder).
    pub fn attend(&self, q: Tensor<4>, k: Tensor<4>, v: Tensor<4>, causal: bool) -> Tensor<4> {
        if !causal && uses_fused(&q) {
            attend_fused(q, k, v)
        } else {
            self.attend_chunked(q, k, v, causal)
        }
    }

    /// [`attend`](Self::attend) in score chunks, whatever the strategy.
    pub fn attend_chunked(
        &self,
        q: Tensor<4>,
        k: Tensor<4>,
        v: Tensor<4>,
        causal: bool,
    ) -> Tensor<4> {
        let [b, h, nq, d] = q.dims();
        let nk = k.dims()[2];
        let dv = v.dims()[3];
        let scale = (d as f64).powf(-0.5);
        let bh = b * h;
        let q = q.reshape([bh, nq, d]);
        let k_t = k.reshape([bh, nk, d]).swap_dims(1, 2);
        let v = v.reshape([bh, nk, dv]);
        let elem = q.dtype().size();
        let plan = self.chunking(bh, nq, nk, elem);

        let mut head_outputs = Vec::new();
        for h0 in (0..bh).step_by(plan.heads_per_chunk) {
            let hn = plan.heads_per_chunk.min(bh - h0);
            let qh = q.clone().narrow(0, h0, hn);
            let kh = k_t.clone().narrow(0, h0, hn);
            let vh = v.clone().narrow(0, h0, hn);
            let mut rows = Vec::new();
            for q0 in (0..nq).step_by(plan.queries_per_chunk) {
                let qn = plan.queries_per_chunk.min(nq - q0);
                let qc = if qn == nq {
                    qh.clone()
                } else {
                    qh.clone().narrow(1, q0, qn)
                };
                let mut scores = qc.matmul(kh.clone()) * scale;
                if causal {
                    scores = scores.mask_fill(causal_mask(q0, qn, nk, &vh), f32::NEG_INFINITY);
                }
                rows.push(softmax(scores, 2).matmul(vh.clone()));
            }
            head_outputs.push(if rows.len() == 1 {
                rows.remove(0)
            } else {
                Tensor::cat(rows, 1)
            });
        }
        let out = if head_outputs.len() == 1 {
            head_outputs.remove(0)
        } else {
            Tensor::cat(head_outputs, 0)
        };
        out.reshape([b, h, nq, dv])
    }

    /// The gradients of [`attend`](Self::attend) (not causal) with respect to `q`, `k` and `v`,
    /// given its output `o` and the gradient `g` arriving at it, recomputing the scores chunk by
    /// chunk. Under burn's autodiff every score chunk of a layer stays alive until the backward
    /// pass (about three score-sized tensors per head, BURN.md §3); here at most one chunk's
    /// scores exist at a time, so a 64x64 self-attention needs tens of MiB, not gigabytes.
    /// `g` may have a multiple of `q`'s batch rows (the guidance pulls back one row per energy
    /// from one kept forward): each group of rows is pulled back against the same `q`, `k`,
    /// `v`, `o`, laid out by heads once, and the gradients have `g`'s rows.
    pub fn attend_pullback(
        &self,
        q: Tensor<4>,
        k: Tensor<4>,
        v: Tensor<4>,
        o: Tensor<4>,
        g: Tensor<4>,
    ) -> (Tensor<4>, Tensor<4>, Tensor<4>) {
        let [b, h, nq, d] = q.dims();
        let nk = k.dims()[2];
        let dv = v.dims()[3];
        let rows = g.dims()[0];
        let scale = (d as f64).powf(-0.5);
        let bh = b * h;
        let q = q.reshape([bh, nq, d]);
        let k = k.reshape([bh, nk, d]);
        let v = v.reshape([bh, nk, dv]);
        let o = o.reshape([bh, nq, dv]);
        let g_all = g.reshape([rows * h, nq, dv]);
        let plan = self.chunking(bh, nq, nk, q.dtype().size());

        let (mut gq_heads, mut gk_heads, mut gv_heads) = (Vec::new(), Vec::new(), Vec::new());
        for r0 in (0..rows).step_by(b.max(1)) {
            let g = g_all.clone().narrow(0, r0 * h, bh);
            for h0 in (0..bh).step_by(plan.heads_per_chunk) {
                let hn = plan.heads_per_chunk.min(bh - h0);
                let kh = k.clone().narrow(0, h0, hn);
                let vh = v.clone().narrow(0, h0, hn);
                let (k_t, v_t) = (kh.clone().swap_dims(1, 2), vh.clone().swap_dims(1, 2));
                let mut gq_rows = Vec::new();
                let mut gk: Option<Tensor<3>> = None;
                let mut gv: Option<Tensor<3>> = None;
                for q0 in (0..nq).step_by(plan.queries_per_chunk) {
                    let qn = plan.queries_per_chunk.min(nq - q0);
                    let chunk = |t: &Tensor<3>| t.clone().narrow(0, h0, hn).narrow(1, q0, qn);
                    let (qc, oc, gc) = (chunk(&q), chunk(&o), chunk(&g));
                    let p = softmax(qc.clone().matmul(k_t.clone()) * scale, 2);
                    let gv_part = p.clone().swap_dims(1, 2).matmul(gc.clone());
                    // dS = P ⊙ (dP − rowsum(dO ⊙ O)), the softmax Jacobian applied row by row.
                    let delta = (gc.clone() * oc).sum_dim(2);
                    let ds = p * (gc.matmul(v_t.clone()) - delta) * scale;
                    gq_rows.push(ds.clone().matmul(kh.clone()));
                    let gk_part = ds.swap_dims(1, 2).matmul(qc);
                    gk = Some(gk.map_or(gk_part.clone(), |a| a + gk_part));
                    gv = Some(gv.map_or(gv_part.clone(), |a| a + gv_part));
                }
                gq_heads.push(Tensor::cat(gq_rows, 1));
                gk_heads.extend(gk);
                gv_heads.extend(gv);
            }
        }
        (
            Tensor::cat(gq_heads, 0).reshape([rows, h, nq, d]),
            Tensor::cat(gk_heads, 0).reshape([rows, h, nk, d]),
            Tensor::cat(gv_heads, 0).reshape([rows, h, nk, dv]),
        )
    }
}

/// True where key index > query index, for query rows `q0..q0+qn`.
fn causal_mask(q0: usize, qn: usize, nk: usize, like: &Tensor<3>) -> Tensor<3, Bool> {
    let values: Vec<bool> = (0..qn)
        .flat_map(|i| (0..nk).map(move |j| j > q0 + i))
        .collect();
    Tensor::<2, Bool>::from_data(
        burn::tensor::TensorData::new(values, [qn, nk]),
        &like.device(),
    )
    .unsqueeze_dim(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{layer_wave, max_abs};

    const MIB: usize = 1 << 20;

    #[test]
    fn sd15_self_attention_at_512px_stays_under_budget() {
        // up_blocks.3 at a 64x64 latent: 8 heads, 4096 tokens, CFG batch of 2, f32.
        let plan = AttentionPlan::default();
        let c = plan.chunking(2 * 8, 4096, 4096, 4);
        assert!(c.score_bytes(4096, 4) <= 64 * MIB);
        assert_eq!(c.heads_per_chunk, 1);
        assert_eq!(c.queries_per_chunk, 4096);
        // At 768 px (96x96 latent, 9216 tokens) one head is 324 MiB: split into row blocks.
        let c = plan.chunking(8, 9216, 9216, 4);
        assert!(c.score_bytes(9216, 4) <= 64 * MIB);
        // Small attention (cross-attention, 77 keys) runs in one piece.
        let c = plan.chunking(16, 4096, 77, 4);
        assert_eq!((c.heads_per_chunk, c.queries_per_chunk), (16, 4096));
    }

    /// 2 x 3 heads, 10 queries and 7 keys, with value width 5 unlike the key width 4.
    fn qkv(device: &burn::tensor::Device) -> (Tensor<4>, Tensor<4>, Tensor<4>) {
        (
            layer_wave([2, 3, 10, 4], 0.1, device),
            layer_wave([2, 3, 7, 4], 1.3, device),
            layer_wave([2, 3, 7, 5], 2.7, device),
        )
    }

    #[test]
    fn chunked_equals_whole() {
        let device = burn::tensor::Device::flex();
        let shape = [2, 3, 10, 4];
        let (q, k, v) = (
            layer_wave(shape, 0.1, &device),
            layer_wave(shape, 1.3, &device),
            layer_wave(shape, 2.7, &device),
        );
        for causal in [false, true] {
            let whole = AttentionPlan {
                max_score_bytes: usize::MAX,
            }
            .attend(q.clone(), k.clone(), v.clone(), causal);
            // 12 bytes per score row of 10 keys forces 1 head and 1 query row per chunk... almost.
            let tiny = AttentionPlan {
                max_score_bytes: 3 * 10 * 4,
            }
            .attend(q.clone(), k.clone(), v.clone(), causal);
            let diff = max_abs(whole - tiny);
            assert!(diff < 1e-6, "causal={causal} diff={diff}");
        }
    }

    #[test]
    fn fused_equals_chunked() {
        let device = burn::tensor::Device::flex();
        let (q, k, v) = qkv(&device);
        let chunked =
            AttentionPlan::default().attend_chunked(q.clone(), k.clone(), v.clone(), false);
        // All heads in one call, then one head per call.
        for budget in [usize::MAX, 1] {
            let fused = fused_in_groups(q.clone(), k.clone(), v.clone(), budget);
            let diff = max_abs(fused - chunked.clone());
            assert!(diff < 1e-5, "budget {budget}: {diff}");
        }
    }

    #[test]
    fn pullback_matches_autodiff() {
        // The chunked, recomputing backward against burn's autodiff through the plain forward,
        // for a chunking that splits both heads and query rows.
        let device = burn::tensor::Device::flex();
        let (q, k, v) = qkv(&device);
        let g = layer_wave([2, 3, 10, 5], 4.1, &device);
        let whole = AttentionPlan {
            max_score_bytes: usize::MAX,
        };
        let leaves = [&q, &k, &v].map(|t| t.clone().autodiff().require_grad());
        let out = whole.attend(
            leaves[0].clone(),
            leaves[1].clone(),
            leaves[2].clone(),
            false,
        );
        let grads = (out * g.clone()).sum().backward();
        let expected = leaves.map(|l| l.grad(&grads).expect("every input has a gradient"));

        let plan = AttentionPlan {
            max_score_bytes: 3 * 7 * 4,
        };
        assert_eq!(plan.chunking(6, 10, 7, 4).heads_per_chunk, 1);
        assert_eq!(plan.chunking(6, 10, 7, 4).queries_per_chunk, 3);
        let o = plan.attend(q.clone(), k.clone(), v.clone(), false);
        let (gq, gk, gv) = plan.attend_pullback(q.clone(), k.clone(), v.clone(), o, g.clone());
        for (name, got, want) in [
            ("q", gq, &expected[0]),
            ("k", gk, &expected[1]),
            ("v", gv, &expected[2]),
        ] {
            let err = max_abs(got - want.clone());
            let size = max_abs(want.clone());
            // f32 sums of at most 10 terms reordered: a few ulps of the largest entry.
            assert!(err <= 1e-5 * size, "d{name}: max error {err} of {size}");
        }

        // Two groups of cotangent rows against the same forward: the pull-back is linear in
        // `g`, so the second group's gradients (at `g / 2`) are half the first's.
        let wide = Tensor::cat(vec![g.clone(), g.clone() * 0.5], 0);
        let o = plan.attend(q.clone(), k.clone(), v.clone(), false);
        let (gq, gk, gv) = plan.attend_pullback(q.clone(), k.clone(), v.clone(), o.clone(), g);
        let (wq, wk, wv) = plan.attend_pullback(q, k, v, o, wide);
        for (name, got, one) in [("q", wq, gq), ("k", wk, gk), ("v", wv, gv)] {
            let want = Tensor::cat(vec![one.clone(), one * 0.5], 0);
            assert_eq!(got.dims(), want.dims(), "d{name}");
            let err = max_abs(got - want.clone());
            let size = max_abs(want);
            assert!(
                err <= 1e-6 * size,
                "d{name} of two row groups: max error {err} of {size}"
            );
        }
    }
}
