//! The oracles of ALGORITHM.md §12 that need no model: move mask geometry and latent shifts,
//! drag patches; and the spec's validation messages.

use ::image::{Rgb, RgbImage};
use dragonedit::edit::mask::Mask;
use dragonedit::edit::plan::{EnergyPlan, LatentEdit};
use dragonedit::edit::{Edit, EditPlan, EditSpec, Fidelity};

/// A grey 512x512 photo and a PNG mask of rows 192..319, columns 128..255 (§12.2).
fn photo(w: u32, h: u32) -> RgbImage {
    RgbImage::from_pixel(w, h, Rgb([128, 128, 128]))
}

fn png(img: &RgbImage) -> Vec<u8> {
    dragonedit::image::encode_png(img).expect("png")
}

fn object_mask(w: u32, h: u32, rows: std::ops::Range<u32>, cols: std::ops::Range<u32>) -> Vec<u8> {
    let m = RgbImage::from_fn(w, h, |x, y| {
        if rows.contains(&y) && cols.contains(&x) {
            Rgb([255, 255, 255])
        } else {
            Rgb([0, 0, 0])
        }
    });
    png(&m)
}

fn resolve(json: &str, image: RgbImage, files: &[(&str, Vec<u8>)]) -> dragonedit::Result<Edit> {
    let spec = EditSpec::from_json(json)?;
    spec.resolve(image, None, &mut |name| {
        files
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, b)| b.clone())
            .ok_or_else(|| dragonedit::Error::Spec(format!("no file {name}")))
    })
}

fn span(m: &Mask, by_rows: bool) -> (usize, usize) {
    let idx: Vec<usize> = m
        .indices()
        .iter()
        .map(|&i| if by_rows { i / m.w } else { i % m.w })
        .collect();
    (
        *idx.iter().min().expect("non-empty"),
        *idx.iter().max().expect("non-empty"),
    )
}

fn move_plan(dx: i32, dy: i32, r: f64, quirks: bool) -> EditPlan {
    let (x0, y0) = (150, 250);
    let json = format!(
        r#"{{"mode": "move", "mask": "m.png", "from": [{x0}, {y0}], "to": [{}, {}],
             "scale": {r}, "resolution": 512}}"#,
        x0 + dx,
        y0 + dy
    );
    let mask = object_mask(512, 512, 192..320, 128..256);
    let edit = resolve(&json, photo(512, 512), &[("m.png", mask)]).expect("resolves");
    EditPlan::new(
        &edit,
        (512, 512),
        Fidelity {
            reference_quirks: quirks,
        },
    )
    .expect("plan")
}

fn masks(plan: &EditPlan) -> std::collections::HashMap<&'static str, Mask> {
    plan.trace_masks().into_iter().collect()
}

#[test]
fn move_mask_geometry_matches_the_algorithm_table() {
    // (dx, dy, r) → Mcur rows, cols; overlap; hole; other (ALGORITHM.md §12.2).
    let table = [
        (96, -32, 1.0, (40, 71), (56, 87), Some((192, 832, 14528))),
        (0, 0, 0.5, (56, 71), (48, 63), Some((256, 768, 15360))),
        (40, 0, 1.5, (40, 87), (31, 78), None),
        (-50, 13, 1.0, (51, 82), (19, 50), None),
    ];
    for (dx, dy, r, rows, cols, counts) in table {
        for quirks in [true, false] {
            let plan = move_plan(dx, dy, r, quirks);
            let m = masks(&plan);
            let cur = &m["mask_cur"];
            assert_eq!(span(cur, true), rows, "({dx},{dy},{r}) rows");
            assert_eq!(span(cur, false), cols, "({dx},{dy},{r}) cols");
            let original = m["mask_overlap"].or(&m["mask_non_overlap"]);
            assert_eq!(original.count(), 1024);
            if let Some((overlap, hole, other)) = counts {
                assert_eq!(m["mask_overlap"].count(), overlap);
                assert_eq!(m["mask_non_overlap"].count(), hole);
                assert_eq!(m["mask_other"].count(), other);
            }
        }
    }
    // r = 1.5, dx = 40: the enlarged object covers its old place, the hole is empty (the
    // official code's NaN case); the plan keeps the empty mask and the energy drops the term.
    assert!(masks(&move_plan(40, 0, 1.5, false))["mask_non_overlap"].is_empty());
}

fn latent_shift(plan: &EditPlan) -> (i64, i64) {
    match &plan.latent_edit {
        LatentEdit::Move { rows, cols, .. } => (rows.shift, cols.shift),
        _ => panic!("move plan"),
    }
}

#[test]
fn move_latent_shifts_follow_the_reference_or_round() {
    // §12.2: the reference truncates d/8: (96, −32) → (−4, 12); (−50, 13) → (1, −6).
    assert_eq!(latent_shift(&move_plan(96, -32, 1.0, true)), (-4, 12));
    assert_eq!(latent_shift(&move_plan(-50, 13, 1.0, true)), (1, -6));
    // Fixed: the nearest latent cell, 13/8 = 1.6 → 2 and −50/8 = −6.25 → −6.
    assert_eq!(latent_shift(&move_plan(-50, 13, 1.0, false)), (2, -6));
}

#[test]
fn drag_patches_match_the_algorithm_oracle() {
    // §12.3: handle (100, 200) → target (140, 200) at 512 px.
    let json = r#"{"mode": "drag", "mask": "m.png", "resolution": 512,
                   "points": [{"handle": [100, 200], "target": [140, 200]},
                              {"handle": [3, 3], "target": [509, 3]}]}"#;
    let mask = object_mask(512, 512, 0..512, 0..512);
    let edit = resolve(json, photo(512, 512), &[("m.png", mask)]).expect("resolves");
    let plan = EditPlan::new(&edit, (512, 512), Fidelity::default()).expect("plan");
    let EnergyPlan::Drag { patches, .. } = &plan.energy else {
        panic!("drag plan");
    };
    assert_eq!(patches[0].handle_center, (50, 25));
    assert_eq!(patches[0].target_center, (50, 35));
    let rows: Vec<usize> = patches[0].handle.iter().map(|i| i / 128).collect();
    let cols: Vec<usize> = patches[0].handle.iter().map(|i| i % 128).collect();
    assert_eq!((rows[0], rows[8], cols[0], cols[8]), (49, 51, 24, 26));
    let LatentEdit::Drag { copies, .. } = &plan.latent_edit else {
        panic!("drag latent edit");
    };
    // The reference's latent copy: rows 24..26, columns 11..13 → 16..18 (centres 25,12 → 25,17).
    assert_eq!(copies[0], ((25, 12), (25, 17)));
    // A point at (3, 3) gives the reference an invalid slice (start −1); ours is clamped.
    assert_eq!(patches[1].handle_center, (1, 1));
    assert_eq!(copies[1].0, (1, 1));
    assert_eq!(patches[1].target_center, (1, 126));
    assert_eq!(copies[1].1, (1, 62));
}

#[test]
fn drag_x_clip_uses_the_width_unless_reproducing_the_reference() {
    // 768 x 256 photo: grid 64 x 192. A point at x = 760 → column 190 → clipped to 190 by the
    // width, but to 14 by the reference's height bound.
    let json = r#"{"mode": "drag", "mask": "m.png", "resolution": 443,
                   "points": [{"handle": [760, 100], "target": [700, 100]}]}"#;
    let mask = object_mask(768, 256, 0..256, 0..768);
    let edit = resolve(json, photo(768, 256), &[("m.png", mask)]).expect("resolves");
    for (quirks, col) in [(false, 190), (true, 62)] {
        let plan = EditPlan::new(
            &edit,
            (256, 768),
            Fidelity {
                reference_quirks: quirks,
            },
        )
        .expect("plan");
        let EnergyPlan::Drag { patches, .. } = &plan.energy else {
            panic!("drag plan");
        };
        assert_eq!(patches[0].handle_center.1, col, "quirks={quirks}");
    }
}

#[test]
fn spec_errors_say_what_to_fix() {
    let mask = object_mask(64, 64, 10..20, 10..20);
    let small = object_mask(32, 32, 1..3, 1..3);
    let empty = object_mask(64, 64, 0..0, 0..0);
    let files = [
        ("m.png", mask.clone()),
        ("small.png", small),
        ("empty.png", empty),
        ("bad.png", b"not a png".to_vec()),
    ];
    let cases = [
        (
            r#"{"mode": "move", "mask": "m.png", "from": [10, 10], "to": [70, 10]}"#,
            "outside the 64x64 image",
        ),
        (
            r#"{"mode": "move", "mask": "small.png", "from": [10, 10], "to": [20, 10]}"#,
            "is 32x32 but its image is 64x64",
        ),
        (
            r#"{"mode": "move", "mask": "empty.png", "from": [10, 10], "to": [20, 10]}"#,
            "is empty",
        ),
        (
            r#"{"mode": "move", "mask": "m.png", "from": [10, 10], "to": [20, 10], "scale": 0}"#,
            "scale must be between",
        ),
        (
            r#"{"mode": "appearance", "mask": "m.png", "reference_mask": "m.png"}"#,
            "needs a reference image",
        ),
        (
            r#"{"mode": "drag", "mask": "m.png", "points": []}"#,
            "at least one point pair",
        ),
        (
            r#"{"mode": "drag", "mask": "bad.png", "points": [{"handle": [1,1], "target": [2,2]}]}"#,
            "not a PNG or JPEG",
        ),
        (
            r#"{"mode": "move", "mask": "m.png", "from": [1, 1], "to": [2, 2], "strenghts": {}}"#,
            "unknown field \"strenghts\"",
        ),
        (
            r#"{"mode": "move", "mask": "m.png", "from": [1, 1], "to": [2, 2], "strengths": {"w_edti": 1}}"#,
            "unknown field `w_edti`",
        ),
        (r#"{"mode": "teleport"}"#, "unknown mode \"teleport\""),
        (
            r#"{"mode": "move", "mask": "m.png", "from": [1, 1], "to": [2, 2], "steps": 0}"#,
            "steps must be between",
        ),
    ];
    for (json, expected) in cases {
        let err = resolve(json, photo(64, 64), &files)
            .err()
            .unwrap_or_else(|| panic!("{json} should fail"))
            .to_string();
        assert!(err.contains(expected), "{json}: {err}");
    }
}

#[test]
fn defaults_follow_the_reference_ui() {
    let spec = EditSpec::from_json(
        r#"{"mode": "drag", "mask": "m.png", "points": [{"handle": [1,1], "target": [2,2]}]}"#,
    )
    .expect("parses");
    let s = spec.strengths();
    assert_eq!(
        (s.guidance_scale, s.energy_scale, s.w_edit),
        (4.0, 2.0, 4.0)
    );
    assert_eq!((s.w_content, s.w_inpaint), (6.0, 0.2));
    assert_eq!((spec.steps, spec.seed, spec.resolution), (50, 42, 512));
    let face = EditSpec::from_json(
        r#"{"mode": "face_landmarks", "points": [{"handle": [1,1], "target": [2,2]}],
            "strengths": {"w_edit": 15}}"#,
    )
    .expect("parses");
    assert_eq!(face.strengths().w_edit, 15.0);
    assert_eq!(face.strengths().energy_scale, 3.0);
    // The JSON round-trips.
    let again = EditSpec::from_json(&face.to_json()).expect("round trip");
    assert_eq!(again, face);
}
