//! Behaviour of the editing engine on the tiny model that the reference fixtures cannot show:
//! the self-consistency and gradient oracles of ALGORITHM.md §12, the edge cases of §14
//! (finite results or clear errors where the official release gives NaN or crashes),
//! non-square photos, the two memory-bank policies, and cancellation.

mod common;

use ::image::{Rgb, RgbImage};
use burn::tensor::{Device, Tensor, TensorData};
use common::*;
use dragonedit::edit::{
    BankPolicy, Edit, EditPlan, EditSpec, Editor, EngineOptions, Fidelity, GradientMemory,
    InversionCache, Preview, guidance,
};
use dragonedit::model::attention::AttentionPlan;
use dragonedit::{Error, Phase, Progress};
use pollster::block_on;

fn read(case: &str, name: &str) -> Vec<u8> {
    std::fs::read(fixtures().join(case).join(name)).expect("fixture file")
}

fn photo(case: &str, name: &str) -> RgbImage {
    dragonedit::image::decode(&read(case, name)).expect("decodes")
}

/// Resolves `json` against fixture `case`: its image.png, its reference.png when the mode
/// needs one, and its mask files; `full.png` is a 128x128 mask marking everything.
fn edit(json: &str, case: &str) -> Edit {
    let spec = EditSpec::from_json(json).expect("spec");
    let reference = reference_of(case, &spec);
    spec.resolve(photo(case, "image.png"), reference, &mut |name| {
        Ok(if name == "full.png" {
            dragonedit::image::encode_png(&RgbImage::from_pixel(128, 128, Rgb([255; 3])))?
        } else {
            read(case, name)
        })
    })
    .expect("resolves")
}

fn plan(e: &Edit) -> EditPlan {
    let (h, w) = (e.image.height() as usize, e.image.width() as usize);
    EditPlan::new(e, (h, w), Fidelity::default()).expect("plan")
}

/// The specs of the five modes on the fixtures' 128x128 scenes.
fn mode_specs() -> Vec<(&'static str, &'static str, &'static str)> {
    vec![
        (
            "move",
            "move",
            r#"{"mode": "move", "mask": "mask.png", "from": [40, 64], "to": [72, 72],
                "prompt": "a photo of a red ball on the table", "resolution": 128}"#,
        ),
        (
            "drag",
            "drag",
            r#"{"mode": "drag", "mask": "mask.png", "resolution": 128,
                "points": [{"handle": [52, 64], "target": [64, 60]}]}"#,
        ),
        (
            "face",
            "face_landmark",
            r#"{"mode": "face_landmarks", "resolution": 128,
                "points": [{"handle": [30, 70], "target": [27, 70]},
                           {"handle": [64, 110], "target": [64, 113]}]}"#,
        ),
        (
            "appearance",
            "appearance",
            r#"{"mode": "appearance", "mask": "mask.png", "reference_mask": "ref_mask.png",
                "resolution": 128}"#,
        ),
        (
            "paste",
            "paste",
            r#"{"mode": "paste", "reference_mask": "mask.png", "offset": [-54, 32],
                "resolution": 128}"#,
        ),
    ]
}

fn reference_of(case: &str, e: &EditSpec) -> Option<RgbImage> {
    e.mode
        .kind()
        .needs_reference()
        .then(|| photo(case, "reference.png"))
}

fn dot(a: &[f32], b: &[f32]) -> f64 {
    a.iter()
        .zip(b)
        .map(|(x, y)| f64::from(*x) * f64::from(*y))
        .sum()
}

fn tensor(v: Vec<f32>, like: &Tensor<4>) -> Tensor<4> {
    let dims = like.dims();
    Tensor::from_data(TensorData::new(v, dims), &like.device())
}

/// The generated latent at step 2 of `case`'s reference run, the inversion latent it is guided
/// towards, and the conditional text embedding.
fn step_two_inputs(case: &str, device: &Device) -> (Tensor<4>, Tensor<4>, Tensor<3>) {
    let z = npy(case, "step_latents.npy").index(2).tensor(device);
    let z_ref = npy(case, "inversion_latents.npy").index(48).tensor(device);
    let cond = npy(case, "text_embeddings.npy")
        .tensor::<3>(device)
        .narrow(0, 1, 1);
    (z, z_ref, cond)
}

/// §12.5: central finite differences of each energy along a fixed pseudo-random direction
/// match the autodiff gradient, and stepping against the gradient lowers the energy.
#[test]
fn energy_gradients_match_finite_differences() {
    let device = Device::flex();
    let sd = load_tiny(&device);
    for (name, case, json) in mode_specs() {
        let e = edit(json, case);
        let p = plan(&e);
        // Step 2 of the reference run: the generated and reference latents differ (at step 0
        // drag's are equal and its content gradient vanishes).
        let (z, z_ref, cond) = step_two_inputs(case, &device);
        let t = 941.0;
        let at = |z: &Tensor<4>| {
            block_on(guidance::evaluate(
                &sd.unet,
                &p,
                z,
                &z_ref,
                t,
                &cond,
                GradientMemory::default(),
            ))
            .expect("ok")
        };
        let g0 = at(&z);
        let zv = values(z.clone());
        let n = zv.len();
        let dir: Vec<f32> = (0..n)
            .map(|i| ((i as f32 * 12.9898).sin() * 43758.545).fract() - 0.5)
            .collect();
        let norm = dot(&dir, &dir).sqrt() as f32;
        let dir: Vec<f32> = dir.iter().map(|d| d / norm).collect();
        let h = 1e-2f32;
        let shifted = |s: f32| tensor(zv.iter().zip(&dir).map(|(a, d)| a + s * d).collect(), &z);
        let (plus, minus) = (at(&shifted(h)), at(&shifted(-h)));
        let mut terms = vec![(
            "edit",
            g0.e_edit,
            plus.e_edit,
            minus.e_edit,
            g0.g_edit.clone(),
        )];
        if let Some(gc) = &g0.g_content {
            terms.push((
                "content",
                g0.e_content,
                plus.e_content,
                minus.e_content,
                gc.clone(),
            ));
        }
        for (term, e0, ep, em, grad) in terms {
            let g = values(grad);
            let fd = f64::from(ep - em) / (2.0 * f64::from(h));
            let analytic = dot(&g, &dir);
            let gnorm = dot(&g, &g).sqrt();
            let err = (fd - analytic).abs() / gnorm;
            println!(
                "{name} E_{term} = {e0:.3}: finite difference {fd:.4}, autodiff {analytic:.4}, |g| {gnorm:.3}, error {err:.1e} of |g|"
            );
            // f32 energies of ~1e3 carry ~1e-4 absolute rounding, ~5e-3 over 2h = 0.02, i.e.
            // ~1e-4 of |g| here (measured up to 4.5e-4): a wrong sign, factor or missing term
            // is off by the order of |g|.
            assert!(
                err < 5e-3,
                "{name} E_{term}: finite difference {fd} vs {analytic}"
            );
            // A small step against the gradient lowers the energy.
            let step = 1e-2 / gnorm as f32;
            let lower = tensor(zv.iter().zip(&g).map(|(a, gi)| a - step * gi).collect(), &z);
            let e1 = at(&lower);
            let e1 = if term == "edit" {
                e1.e_edit
            } else {
                e1.e_content
            };
            assert!(
                e1 < e0,
                "{name} E_{term}: {e1} after a descent step from {e0}"
            );
        }
    }
}

/// The low-memory guidance backwards (per-step graphs, step recomputation, or hand-written
/// pull-backs from one row's checkpoints, all with the chunked attention backward) give the
/// tape's gradients in every mode, also when attention is cut into single heads and a few
/// query rows (the chunking a 512 px run uses).
#[test]
fn low_memory_guidance_gradients_equal_the_tape() {
    let device = Device::flex();
    let sd = load_tiny(&device);
    let mut chunked = sd.unet.clone();
    // 64 score rows of 64 keys: one head and 64 of 256 query rows per chunk at this size.
    chunked.attention = AttentionPlan {
        max_score_bytes: 64 * 64 * 4,
    };
    for (name, case, json) in mode_specs() {
        let e = edit(json, case);
        let p = plan(&e);
        let (z, z_ref, cond) = step_two_inputs(case, &device);
        let tape = block_on(guidance::evaluate(
            &sd.unet,
            &p,
            &z,
            &z_ref,
            941.0,
            &cond,
            GradientMemory::Tape,
        ))
        .expect("tape");
        for (how, unet, memory) in [
            ("flash, whole", &sd.unet, GradientMemory::Flash),
            ("flash, chunked", &chunked, GradientMemory::Flash),
            ("recompute, whole", &sd.unet, GradientMemory::Recompute),
            ("recompute, chunked", &chunked, GradientMemory::Recompute),
            ("lean, whole", &sd.unet, GradientMemory::Lean),
            ("lean, chunked", &chunked, GradientMemory::Lean),
        ] {
            let rec = block_on(guidance::evaluate(
                unet, &p, &z, &z_ref, 941.0, &cond, memory,
            ))
            .expect(how);
            // The same f32 arithmetic regrouped (chunk sums, a hand-written softmax backward):
            // rounding grown through ~40 layers, measured 7e-7 to 2.5e-6; a wrong term or a
            // missed skip gradient is off by far more.
            assert_close(
                &format!("{name} {how}: g_edit"),
                &values(rec.g_edit),
                &values(tape.g_edit.clone()),
                2e-5,
            );
            assert_eq!(rec.g_content.is_some(), tape.g_content.is_some());
            if let (Some(a), Some(b)) = (rec.g_content, &tape.g_content) {
                assert_close(
                    &format!("{name} {how}: g_content"),
                    &values(a),
                    &values(b.clone()),
                    2e-5,
                );
            }
            assert_close(
                &format!("{name} {how}: E_edit"),
                &[rec.e_edit],
                &[tape.e_edit],
                1e-5,
            );
        }
    }
}

/// §12.4: with the generated latent equal to the reference and no displacement, every
/// similarity is 1, so E_edit = λ·w_e/5 (drag, face) and the content energy is λ·w_c/5.
#[test]
fn zero_displacement_gives_the_perfect_similarity_energies() {
    let device = Device::flex();
    let sd = load_tiny(&device);
    let json = r#"{"mode": "drag", "mask": "mask.png", "resolution": 128,
                   "points": [{"handle": [52, 64], "target": [52, 64]},
                              {"handle": [100, 40], "target": [100, 40]}]}"#;
    let e = edit(json, "drag");
    let p = plan(&e);
    let z: Tensor<4> = npy("drag", "inversion_latents.npy")
        .index(40)
        .tensor(&device);
    let cond: Tensor<3> = npy("drag", "text_embeddings.npy")
        .tensor::<3>(&device)
        .narrow(0, 1, 1);
    let g = block_on(guidance::evaluate(
        &sd.unet,
        &p,
        &z,
        &z,
        781.0,
        &cond,
        GradientMemory::default(),
    ))
    .expect("finite");
    let lambda = 2000.0;
    assert_close("E_edit", &[g.e_edit], &[lambda * 4.0 / 5.0], 1e-5);
    assert_close("E_content", &[g.e_content], &[lambda * 6.0 / 5.0], 1e-5);
}

fn run(editor: &Editor, e: &Edit) -> Result<dragonedit::edit::EditOutput, Error> {
    block_on(editor.run(e, None, &mut |_| true))
}

fn assert_finite_image(what: &str, out: &dragonedit::edit::EditOutput, size: (u32, u32)) {
    let v = values(out.final_latent.clone());
    assert!(v.iter().all(|x| x.is_finite()), "{what}: non-finite latent");
    assert_eq!(out.image.dimensions(), size, "{what}: output size");
}

/// §14: the cases where the official release produces NaN or fails give a finite image here.
#[test]
fn edge_cases_give_finite_images() {
    let device = Device::flex();
    let sd = load_tiny(&device);
    let editor = Editor::new(&sd, EngineOptions::default());
    let cases = [
        // The enlarged object covers its old place: empty vacated region (NaN officially).
        (
            "move",
            r#"{"mode": "move", "mask": "mask.png", "from": [40, 64], "to": [50, 64], "scale": 1.5,
                "steps": 8, "resolution": 128}"#,
        ),
        // Zero displacement: empty vacated region too.
        (
            "move",
            r#"{"mode": "move", "mask": "mask.png", "from": [40, 64], "to": [40, 64],
                "steps": 8, "resolution": 128}"#,
        ),
        // Arrow pushing most of the object past the border (wraps around officially).
        (
            "move",
            r#"{"mode": "move", "mask": "mask.png", "from": [20, 64], "to": [0, 64],
                "steps": 8, "resolution": 128}"#,
        ),
        // Handle on its target (empty leave-the-handle set: NaN officially) and points in
        // the corners (an invalid latent slice officially).
        (
            "drag",
            r#"{"mode": "drag", "mask": "mask.png", "steps": 8, "resolution": 128,
                "points": [{"handle": [52, 64], "target": [52, 64]},
                           {"handle": [0, 0], "target": [127, 127]}]}"#,
        ),
        // An editable region covering the whole photo: no content region at all.
        (
            "drag",
            r#"{"mode": "drag", "mask": "full.png", "steps": 8, "resolution": 128,
                "points": [{"handle": [52, 64], "target": [70, 64]}]}"#,
        ),
        // A landmark in a corner dragged along the border.
        (
            "face_landmark",
            r#"{"mode": "face_landmarks", "steps": 8, "resolution": 128,
                "points": [{"handle": [0, 0], "target": [127, 0]}]}"#,
        ),
        // Pasting half outside the photo.
        (
            "paste",
            r#"{"mode": "paste", "reference_mask": "mask.png", "offset": [-90, 0],
                "steps": 8, "resolution": 128}"#,
        ),
        // A reference object scaled down.
        (
            "paste",
            r#"{"mode": "paste", "reference_mask": "mask.png", "offset": [10, 10], "scale": 0.5,
                "steps": 8, "resolution": 128}"#,
        ),
    ];
    for (case, json) in cases {
        let e = edit(json, case);
        let out = run(&editor, &e).unwrap_or_else(|err| panic!("{json}: {err}"));
        assert_finite_image(json, &out, (128, 128));
    }
    // Moving the object entirely out of the photo is refused with a message.
    let json = r#"{"mode": "move", "mask": "mask.png", "from": [40, 64], "to": [127, 64],
                   "scale": 0.2, "resolution": 128}"#;
    let e = edit(json, "move");
    match EditPlan::new(&e, (128, 128), Fidelity::default()) {
        Err(err) => assert!(err.to_string().contains("outside the image"), "{err}"),
        Ok(_) => {
            // Scaled to 0.2 about the centre the object may still land inside; then it must
            // run finitely.
            let out = run(&editor, &e).expect("runs");
            assert_finite_image(json, &out, (128, 128));
        }
    }
}

/// Every mode on a non-square photo: 192x128 worked at the same size (latent 24x16).
#[test]
fn non_square_photos_edit_in_every_mode() {
    let device = Device::flex();
    let sd = load_tiny(&device);
    let editor = Editor::new(&sd, EngineOptions::default());
    let widen = |img: &RgbImage| {
        RgbImage::from_fn(192, 128, |x, y| {
            if x < 128 {
                *img.get_pixel(x, y)
            } else {
                Rgb([90, 120, 150])
            }
        })
    };
    let dir = std::env::temp_dir().join(format!("dragonedit-nonsquare-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    for (name, case, json) in mode_specs() {
        let json = json.replace("\"resolution\": 128", "\"resolution\": 157, \"steps\": 6");
        let spec = EditSpec::from_json(&json).expect("spec");
        let image = widen(&photo(case, "image.png"));
        let reference = reference_of(case, &spec).map(|r| widen(&r));
        let e = spec
            .resolve(image, reference, &mut |file| {
                let m = dragonedit::image::decode(&read(case, file))?;
                dragonedit::image::encode_png(&RgbImage::from_fn(192, 128, |x, y| {
                    if x < 128 {
                        *m.get_pixel(x, y)
                    } else {
                        Rgb([0, 0, 0])
                    }
                }))
            })
            .expect("resolves");
        let out = run(&editor, &e).unwrap_or_else(|err| panic!("{name}: {err}"));
        assert_eq!(out.final_latent.dims(), [1, 4, 16, 24], "{name}");
        assert_finite_image(name, &out, (192, 128));
        out.image
            .save(dir.join(format!("{name}.png")))
            .expect("save");
    }
}

/// Storing the memory bank during inversion and recomputing it per step give the same edit.
#[test]
fn stored_and_recomputed_memory_banks_agree() {
    let device = Device::flex();
    let sd = load_tiny(&device);
    for (name, case, json) in mode_specs() {
        if !["move", "appearance"].contains(&name) {
            continue;
        }
        let json = json.replace("\"resolution\": 128", "\"resolution\": 128, \"steps\": 10");
        let e = edit(&json, case);
        let mut latents = Vec::new();
        for bank in [BankPolicy::Store, BankPolicy::Recompute] {
            let editor = Editor::new(
                &sd,
                EngineOptions {
                    bank,
                    fidelity: Fidelity::default(),
                    gradients: GradientMemory::default(),
                },
            );
            let mut trace = dragonedit::edit::Trace::default();
            let out = block_on(editor.run(&e, Some(&mut trace), &mut |_| true)).expect("runs");
            println!("{name}: {bank:?} holds {} bank bytes", trace.bank_bytes);
            latents.push(values(out.final_latent));
        }
        assert_close(
            &format!("{name}: store vs recompute"),
            &latents[0],
            &latents[1],
            1e-6,
        );
    }
}

/// Cancelling from the progress callback stops the edit at the next step with `Cancelled`,
/// and progress runs through inversion then editing.
#[test]
fn cancelling_stops_promptly() {
    let device = Device::flex();
    let sd = load_tiny(&device);
    let editor = Editor::new(&sd, EngineOptions::default());
    let (_, case, json) = mode_specs()[0];
    let e = edit(json, case);
    let mut seen = Vec::new();
    let result = block_on(editor.run(&e, None, &mut |p| {
        seen.push(p);
        !(p.phase == Phase::Editing && p.step == 3)
    }));
    assert!(matches!(result, Err(Error::Cancelled)));
    let last = seen.last().expect("progress reported");
    assert_eq!((last.phase, last.step, last.total), (Phase::Editing, 3, 50));
    assert!(
        seen.iter()
            .any(|p| p.phase == Phase::Inverting && p.step == 50)
    );
}

/// Live previews arrive every `every` steps (not after the last, which the result shows), are
/// latent-sized, and do not change the edit.
#[test]
fn previews_arrive_every_few_steps_and_leave_the_edit_unchanged() {
    let device = Device::flex();
    let sd = load_tiny(&device);
    let editor = Editor::new(&sd, EngineOptions::default());
    let (_, case, json) = mode_specs()[1];
    let json = json.replace("\"resolution\": 128", "\"resolution\": 128, \"steps\": 6");
    let e = edit(&json, case);
    let mut shown = Vec::new();
    let mut show = |step: usize, img: RgbImage| shown.push((step, img.dimensions()));
    let mut preview = Preview {
        every: 2,
        show: &mut show,
    };
    let with = block_on(editor.run_with_preview(&e, None, &mut |_| true, Some(&mut preview)))
        .expect("runs");
    assert_eq!(shown, vec![(2, (16, 16)), (4, (16, 16))]);
    let without = run(&editor, &e).expect("runs");
    assert_eq!(values(with.final_latent), values(without.final_latent));
}

/// A second edit of the same photo reuses the kept inversion and the guided steps' reference
/// features: no inversion step is reported, no guided step takes its reference's features
/// again (but drag's step 0 with the reference quirk, whose reference is the edit's own
/// patched latent), and the result is what a fresh inversion gives (bit for bit, for both bank
/// policies and a cross-image mode). A new prompt, photo or step count inverts again.
#[test]
fn a_second_edit_of_the_same_photo_reuses_its_inversion() {
    let device = Device::flex();
    let sd = load_tiny(&device);
    for (name, case, json) in mode_specs() {
        if !["move", "drag", "paste"].contains(&name) {
            continue;
        }
        for bank in [BankPolicy::Recompute, BankPolicy::Store] {
            let editor = Editor::new(
                &sd,
                EngineOptions {
                    bank,
                    fidelity: Fidelity {
                        reference_quirks: name == "drag",
                    },
                    gradients: GradientMemory::default(),
                },
            );
            let json = json.replace("\"resolution\": 128", "\"resolution\": 128, \"steps\": 6");
            let first = edit(&json, case);
            let mut cache = InversionCache::default();
            let mut inverting = 0;
            let mut count = |p: Progress| {
                if p.phase == Phase::Inverting && p.step < p.total {
                    inverting += 1;
                }
                true
            };
            let run_cached =
                |e: &Edit, cache: &mut InversionCache, count: &mut dyn FnMut(Progress) -> bool| {
                    block_on(editor.run_reusing(e, cache, None, count, None)).expect("runs")
                };
            let a = run_cached(&first, &mut cache, &mut count);
            assert_eq!(cache.feature_hits(), 0, "{name} {bank:?}");
            // Same photo and prompt, another edit of it: a moved arrow, target or offset.
            let moved = json
                .replace("[72, 72]", "[60, 70]")
                .replace("[64, 60]", "[70, 58]")
                .replace("[-54, 32]", "[-40, 30]");
            let second = edit(&moved, case);
            let b = run_cached(&second, &mut cache, &mut count);
            assert_eq!(cache.hits(), 1, "{name} {bank:?}: the second edit reused");
            assert_eq!(
                inverting, 6,
                "{name} {bank:?}: only the first edit inverted"
            );
            let plan = editor.plan(&second).expect("plans");
            let guided = (0..6).filter(|&i| plan.is_guided(i)).count();
            let own = usize::from(plan.step0_reference_is_initial_latent());
            assert_eq!(own, usize::from(name == "drag"), "{name}");
            assert_eq!(
                cache.feature_hits(),
                guided - own,
                "{name} {bank:?}: the guided steps' reference features were reused"
            );
            assert!(cache.feature_bytes() > 0, "{name} {bank:?}");
            let fresh = run(&editor, &second).expect("runs");
            let fresh = values(fresh.final_latent);
            assert_eq!(values(b.final_latent), fresh);
            assert_ne!(
                values(a.final_latent),
                fresh,
                "the second edit is another edit"
            );

            let mut reprompted = second.clone();
            reprompted.prompt.push_str(" at dusk");
            let mut restepped = second.clone();
            restepped.steps = 4;
            let mut repainted = second.clone();
            repainted.image.put_pixel(0, 0, Rgb([1, 2, 3]));
            for e in [reprompted, restepped, repainted] {
                run_cached(&e, &mut cache, &mut |_| true);
            }
            assert_eq!(
                cache.hits(),
                1,
                "{name} {bank:?}: changed inputs inverted again"
            );
            assert_eq!(
                cache.feature_hits(),
                guided - own,
                "{name} {bank:?}: and took their references' features again"
            );
        }
    }
}

/// A cache with a feature budget keeps the guided steps' reference features only while they
/// fit (the browser keeps to one), and a second edit computes the rest again: it reuses as
/// many steps as the budget held, and still equals a fresh edit. A budget of nothing keeps
/// none, and the inversion is reused all the same. A budget lowered between edits drops what
/// no longer fits.
#[test]
fn reference_features_are_kept_within_the_caches_budget() {
    let device = Device::flex();
    let sd = load_tiny(&device);
    let editor = Editor::new(&sd, EngineOptions::default());
    let (_, case, json) = mode_specs()
        .into_iter()
        .find(|(name, ..)| *name == "move")
        .expect("a move spec");
    let json = json.replace("\"resolution\": 128", "\"resolution\": 128, \"steps\": 6");
    let first = edit(&json, case);
    let second = edit(&json.replace("[72, 72]", "[60, 70]"), case);
    let plan = editor.plan(&second).expect("plans");
    let guided = (0..6).filter(|&i| plan.is_guided(i)).count();
    assert!(guided >= 3, "{guided} guided steps: too few to cut");
    let run_cached = |e: &Edit, cache: &mut InversionCache| {
        block_on(editor.run_reusing(e, cache, None, &mut |_| true, None)).expect("runs")
    };
    let mut unbounded = InversionCache::default();
    run_cached(&first, &mut unbounded);
    let per_step = unbounded.feature_bytes() / guided;
    assert_eq!(unbounded.feature_bytes(), per_step * guided, "steps alike");
    let fresh = values(run(&editor, &second).expect("runs").final_latent);
    // Two steps' worth and a half: the third does not fit.
    for (budget, kept) in [(per_step * 5 / 2, 2), (0, 0)] {
        let mut cache = InversionCache::with_feature_budget(budget);
        run_cached(&first, &mut cache);
        assert_eq!(cache.feature_bytes(), per_step * kept, "budget {budget}");
        let b = run_cached(&second, &mut cache);
        assert_eq!(cache.hits(), 1, "budget {budget}: the inversion reused");
        assert_eq!(cache.feature_hits(), kept, "budget {budget}");
        // The second edit's own steps did not push past the budget either.
        assert_eq!(cache.feature_bytes(), per_step * kept, "budget {budget}");
        assert_eq!(values(b.final_latent), fresh, "budget {budget}");
    }
    // An embedder lowering the budget of a cache that holds every step: what no longer fits
    // goes at once, the inversion stays, and later edits keep to the new budget.
    let mut lowered = InversionCache::default();
    run_cached(&first, &mut lowered);
    lowered.set_feature_budget(per_step * 3 / 2);
    assert_eq!(lowered.feature_bytes(), per_step, "one step fits");
    let b = run_cached(&second, &mut lowered);
    assert_eq!(lowered.hits(), 1, "lowered: the inversion reused");
    assert_eq!(lowered.feature_hits(), 1, "lowered");
    assert_eq!(
        lowered.feature_bytes(),
        per_step,
        "lowered, after a second edit"
    );
    assert_eq!(values(b.final_latent), fresh, "lowered");
}
