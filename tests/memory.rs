//! Memory. WebGPU buffer limits: self-attention at SD 1.5's 512 px scale (a 64x64 latent, 4096
//! tokens, 8 heads) must run without any single allocation above 256 MiB. Unchunked, its score matrix
//! alone is one 512 MiB buffer per image. The head width is cut from 40 to 8 to keep the test
//! cheap on software Vulkan: the score matrices, which the chunking bounds, are the same size. Measured on the wgpu backend through burn's
//! memory-pool report (lavapipe in CI also caps bindings at 128 MiB, like WebGPU's default).

//! And the guidance's low-memory gradients (per-step graphs without attention scores, lean
//! checkpoints, or step recomputation) must hold a fraction of what burn's autodiff tape holds, measured on the CPU
//! backend by counting heap bytes.

mod common;

use std::sync::Mutex;

use burn::tensor::{Device, Distribution, Tensor};
use dragonedit::edit::{Editor, EngineOptions, GradientMemory, guidance};
use dragonedit::heap::{CountingAlloc, peak_since, start};
use dragonedit::model::attention::AttentionPlan;
use pollster::block_on;

const MIB: u64 = 1 << 20;

#[global_allocator]
static ALLOCATOR: CountingAlloc = CountingAlloc;

/// The tests of this file measure one at a time.
static SERIAL: Mutex<()> = Mutex::new(());

/// Heap bytes held at the peak of `f`, above what was held before it.
fn peak_during(f: impl FnOnce()) -> usize {
    let base = start();
    f();
    peak_since(base)
}

#[test]
fn low_memory_guidance_holds_a_fraction_of_the_autodiff_tape() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let device = Device::flex();
    let mut sd = common::load_tiny(&device);
    // A 256 px edit: a 32x32 latent, 1024-token self-attention in down_blocks.0, 8 heads, two
    // rows (edit and content). One head's scores per chunk (4 MiB), as a 512 px run has one
    // head's 64 MiB per chunk: the tape keeps every chunk of every layer for the backward.
    sd.unet.attention = AttentionPlan {
        max_score_bytes: 4 << 20,
    };
    let edit = common::move_edit_256();
    let editor = Editor::new(&sd, EngineOptions::default());
    let plan = editor.plan(&edit).expect("plan");
    let z = Tensor::<4>::random([1, 4, 32, 32], Distribution::Normal(0.0, 1.0), &device);
    let cond = Tensor::<3>::random([1, 77, 32], Distribution::Normal(0.0, 1.0), &device);
    let run = |memory| {
        let g = block_on(guidance::evaluate(
            &sd.unet, &plan, &z, &z, 981.0, &cond, memory,
        ))
        .expect("guidance");
        assert!(g.guidance.abs().max().into_scalar::<f32>().is_finite());
    };
    run(GradientMemory::Recompute);
    let tape = peak_during(|| run(GradientMemory::Tape));
    let flash = peak_during(|| run(GradientMemory::Flash));
    let lean = peak_during(|| run(GradientMemory::Lean));
    let recompute = peak_during(|| run(GradientMemory::Recompute));
    let mib = |b: usize| b as f64 / MIB as f64;
    println!(
        "guidance peak heap: tape {:.1} MiB, flash {:.1} MiB, lean {:.1} MiB, recompute {:.1} MiB",
        mib(tape),
        mib(flash),
        mib(lean),
        mib(recompute)
    );
    // The tape holds about three score-sized tensors per head and layer (2 layers x 16 heads x
    // 4 MiB x 3 = 384 MiB) and every activation. Flash holds every step's graph but no score,
    // recomputation about three of one chunk plus the step inputs. Lean keeps a few
    // activations per step, for one row instead of two, and no graph. Measured 536 MiB, 100
    // MiB, 23 MiB and 25 MiB.
    assert!(tape > 256 << 20, "the tape held only {:.1} MiB", mib(tape));
    assert!(
        lean * 3 < flash,
        "lean held {:.1} MiB against flash's {:.1} MiB",
        mib(lean),
        mib(flash)
    );
    assert!(
        flash * 4 < tape,
        "flash held {:.1} MiB against the tape's {:.1} MiB",
        mib(flash),
        mib(tape)
    );
    assert!(
        recompute * 8 < tape,
        "recomputation held {:.1} MiB against the tape's {:.1} MiB",
        mib(recompute),
        mib(tape)
    );
}

#[test]
fn sd15_self_attention_at_512px_allocates_no_buffer_over_256_mib() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let Some(device) = common::wgpu_device() else {
        return;
    };
    let shape = [1, 8, 4096, 8];
    let q = Tensor::<4>::random(shape, Distribution::Normal(0.0, 1.0), &device);
    let k = Tensor::<4>::random(shape, Distribution::Normal(0.0, 1.0), &device);
    let v = Tensor::<4>::random(shape, Distribution::Normal(0.0, 1.0), &device);
    let out = AttentionPlan::default().attend(q, k, v, false);
    let sum = out.sum().into_scalar::<f32>();
    assert!(sum.is_finite());
    let report = device.memory_pool_report().expect("wgpu reports its pools");
    let largest = report.iter().map(|p| p.largest_alloc).max().unwrap_or(0);
    println!(
        "largest single allocation: {:.1} MiB",
        largest as f64 / MIB as f64
    );
    assert!(largest > 0, "the pool report saw no allocation");
    assert!(
        largest <= 256 * MIB,
        "largest allocation {} MiB exceeds 256 MiB",
        largest / MIB
    );
}

/// `release_unused` hands free pages back to the driver: an edit calls it between its phases so
/// that the VAE's and the UNet's activations are not reserved at the same time.
#[test]
fn released_pages_leave_the_pool() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let Some(device) = common::wgpu_device() else {
        return;
    };
    let reserved = || {
        device
            .memory_pool_usage()
            .expect("wgpu reports its usage")
            .bytes_reserved
    };
    dragonedit::device::release_unused(&device);
    let before = reserved();
    // 64 MiB that is computed, read back (so it ran) and dropped.
    let big = Tensor::<2>::random([4096, 4096], Distribution::Normal(0.0, 1.0), &device);
    let sum = block_on(dragonedit::device::read_back((big.clone() * 2.0).sum())).expect("reads");
    assert!(sum[0].is_finite());
    drop(big);
    let held = reserved();
    dragonedit::device::release_unused(&device);
    let after = reserved();
    println!(
        "pool reserved: {:.1} MiB before, {:.1} MiB with the tensors dropped, {:.1} MiB released",
        before as f64 / MIB as f64,
        held as f64 / MIB as f64,
        after as f64 / MIB as f64
    );
    assert!(
        held >= before + 64 * MIB,
        "the pool never held the 64 MiB tensor"
    );
    assert!(
        after + 64 * MIB <= held,
        "release_unused kept the dropped tensors' pages"
    );
}

/// A loaded model's weights are reserved at their own size: each in a buffer of its exact size
/// (the pool's persistent part), not in pages shared with the activations, which the browser's
/// layout rounds up to size buckets (SD 1.5 in f16 on lavapipe: 2959 MiB reserved for 2037 MiB
/// of weights before) and the native one to its page size.
#[test]
fn loaded_weights_are_reserved_at_their_size() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let Some(device) = common::wgpu_device() else {
        return;
    };
    let usage = || device.memory_pool_usage().expect("wgpu reports its usage");
    dragonedit::device::release_unused(&device);
    let before = usage();
    let sd = common::load_tiny(&device);
    let after = usage();
    let in_use = after.bytes_in_use - before.bytes_in_use;
    let reserved = after.bytes_reserved - before.bytes_reserved;
    println!(
        "the tiny model: {:.2} MiB in use, {:.2} MiB reserved",
        in_use as f64 / MIB as f64,
        reserved as f64 / MIB as f64
    );
    assert!(in_use > MIB, "the model holds only {in_use} bytes");
    // Each buffer is padded to the device's alignment (at most 256 bytes) over its size: a few
    // hundred tensors, under 1 %. In the pool's shared pages, as before, lavapipe reserved
    // 24.0 MiB for the tiny model's 20.1.
    assert!(
        reserved <= in_use + in_use / 100,
        "{reserved} bytes reserved for {in_use} in use"
    );
    drop(sd);
}
