//! The native CLI end to end on the tiny model (CPU): it writes images of the right size and
//! explains bad input instead of panicking.

mod common;

use std::process::Command;

fn dragonedit() -> Command {
    Command::new(env!("CARGO_BIN_EXE_dragonedit"))
}

fn tmp(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("dragonedit-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir.join(name)
}

fn model() -> String {
    common::tiny_model_dir().display().to_string()
}

#[test]
fn reconstruct_writes_an_image_at_the_working_resolution() {
    let out = tmp("reconstruct.png");
    let image = common::fixtures().join("move/image.png");
    let status = dragonedit()
        .args(["reconstruct", "--cpu", "--model", &model(), "--steps", "4"])
        .args(["--resolution", "64", "--prompt", "a photo of a red ball"])
        .arg("--image")
        .arg(&image)
        .arg("--out")
        .arg(&out)
        .status()
        .expect("runs");
    assert!(status.success());
    let img = dragonedit::image::decode(&std::fs::read(&out).expect("written")).expect("a PNG");
    assert_eq!(img.dimensions(), (64, 64));
}

#[test]
fn generate_and_invert_write_their_outputs() {
    let png = tmp("generate.png");
    let status = dragonedit()
        .args(["generate", "--cpu", "--model", &model(), "--steps", "3"])
        .args([
            "--width", "64", "--height", "32", "--prompt", "a cat", "--out",
        ])
        .arg(&png)
        .status()
        .expect("runs");
    assert!(status.success());
    let img = dragonedit::image::decode(&std::fs::read(&png).expect("written")).expect("a PNG");
    assert_eq!(img.dimensions(), (64, 32));

    let npy = tmp("latents.npy");
    let status = dragonedit()
        .args([
            "invert",
            "--cpu",
            "--model",
            &model(),
            "--steps",
            "5",
            "--resolution",
            "64",
        ])
        .arg("--image")
        .arg(common::fixtures().join("move/image.png"))
        .arg("--out")
        .arg(&npy)
        .status()
        .expect("runs");
    assert!(status.success());
    let bytes = std::fs::read(&npy).expect("written");
    let file = npyz::NpyFile::new(&bytes[..]).expect("npy");
    assert_eq!(file.shape(), &[6, 1, 4, 8, 8]);
}

#[test]
fn bad_inputs_get_clear_messages() {
    let run = |args: &[&str]| {
        let out = dragonedit().args(args).output().expect("runs");
        assert!(!out.status.success(), "{args:?} should fail");
        let stderr = String::from_utf8_lossy(&out.stderr).to_string();
        assert!(!stderr.contains("panicked"), "{args:?} panicked: {stderr}");
        stderr
    };
    let missing = tmp("nothing-here");
    let msg = run(&[
        "generate",
        "--cpu",
        "--model",
        missing.to_str().expect("utf8"),
        "--prompt",
        "x",
        "--out",
        "x.png",
    ]);
    assert!(msg.contains("is not a directory"), "{msg}");

    let not_image = tmp("not-an-image.png");
    std::fs::write(&not_image, b"hello").expect("write");
    let msg = run(&[
        "reconstruct",
        "--cpu",
        "--model",
        &model(),
        "--steps",
        "2",
        "--image",
        not_image.to_str().expect("utf8"),
        "--out",
        "x.png",
    ]);
    assert!(msg.contains("not a PNG or JPEG"), "{msg}");

    let msg = run(&[
        "generate",
        "--cpu",
        "--model",
        &model(),
        "--prompt",
        "x",
        "--width",
        "60",
        "--out",
        "x.png",
        "--steps",
        "2",
    ]);
    assert!(msg.contains("multiples of 8"), "{msg}");
}

/// `dragonedit edit` on the fixture's move case with `--reference-quirks`: the trace has the
/// reference fixtures' layout, and its tensors match them (end to end from the photo, the
/// same 1e-3 bound as the engine's end-to-end parity tests).
#[test]
fn edit_writes_the_result_and_a_trace_in_the_fixture_layout() {
    let case = common::fixtures().join("move");
    let spec = tmp("move-spec.json");
    std::fs::write(
        &spec,
        format!(
            r#"{{"mode": "move", "mask": "{}", "from": [40, 64], "to": [72, 72],
                "prompt": "a photo of a red ball on the table", "resolution": 128}}"#,
            case.join("mask.png").display()
        ),
    )
    .expect("spec");
    let out = tmp("edited.png");
    let trace = tmp("trace");
    let status = dragonedit()
        .args(["edit", "--cpu", "--model", &model(), "--reference-quirks"])
        .arg("--image")
        .arg(case.join("image.png"))
        .arg("--spec")
        .arg(&spec)
        .arg("--out")
        .arg(&out)
        .arg("--trace")
        .arg(&trace)
        .status()
        .expect("runs");
    assert!(status.success());
    let img = dragonedit::image::decode(&std::fs::read(&out).expect("written")).expect("a PNG");
    assert_eq!(img.dimensions(), (128, 128));
    for name in [
        "vae_latent.npy",
        "inversion_latents.npy",
        "step_latents.npy",
        "eps_cfg.npy",
        "guidance.npy",
        "final_latent.npy",
        "text_embeddings.npy",
        "inversion_text_embeddings.npy",
        "first_guided_step.npz",
        "output.png",
    ] {
        assert!(trace.join(name).is_file(), "trace lacks {name}");
    }
    let read = |path: std::path::PathBuf| {
        let bytes = std::fs::read(path).expect("npy");
        let f = npyz::NpyFile::new(&bytes[..]).expect("npy");
        let shape = f.shape().to_vec();
        (shape, f.into_vec::<f32>().expect("f32"))
    };
    for name in ["step_latents.npy", "guidance.npy", "final_latent.npy"] {
        let (shape, ours) = read(trace.join(name));
        let expected = common::npy("move", name);
        let shape: Vec<usize> = shape.iter().map(|&d| d as usize).collect();
        assert_eq!(shape, expected.shape, "{name}");
        common::assert_close(name, &ours, &expected.values, 1e-3);
    }
}

#[test]
fn edit_explains_bad_specs() {
    let case = common::fixtures().join("appearance");
    let run = |spec_text: &str, extra: &[&str]| {
        let spec = tmp("bad-spec.json");
        std::fs::write(&spec, spec_text).expect("spec");
        let out = dragonedit()
            .args(["edit", "--cpu", "--model", &model(), "--out"])
            .arg(tmp("never.png"))
            .arg("--image")
            .arg(case.join("image.png"))
            .arg("--spec")
            .arg(&spec)
            .args(extra)
            .output()
            .expect("runs");
        assert!(!out.status.success());
        assert!(!tmp("never.png").exists(), "nothing is written on failure");
        let stderr = String::from_utf8_lossy(&out.stderr).to_string();
        assert!(!stderr.contains("panicked"), "{stderr}");
        stderr
    };
    let mask = case.join("mask.png").display().to_string();
    let msg = run(
        &format!(r#"{{"mode": "appearance", "mask": "{mask}", "reference_mask": "{mask}"}}"#),
        &[],
    );
    assert!(msg.contains("needs a reference image"), "{msg}");
    let msg = run(
        r#"{"mode": "drag", "mask": "no-such-mask.png", "points": [{"handle": [1, 1], "target": [2, 2]}]}"#,
        &[],
    );
    assert!(msg.contains("no-such-mask.png"), "{msg}");
    let msg = run("{ not json", &[]);
    assert!(msg.contains("not valid JSON"), "{msg}");
}

/// Runs `dragonedit bench` on the CPU with the tiny model; returns its stdout and table rows.
fn bench_rows(args: &[&str]) -> (String, Vec<String>) {
    let out = dragonedit()
        .args([
            "bench",
            "--cpu",
            "--tiny",
            "--runs",
            "1",
            "--resolution",
            "64",
        ])
        .args(args)
        .output()
        .expect("runs");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rows = stdout
        .lines()
        .filter(|l| l.starts_with("| ") && !l.starts_with("| workload"))
        .map(str::to_string)
        .collect();
    (stdout, rows)
}

/// `dragonedit bench` prints one table row per workload with positive times (tiny random model
/// on the CPU; the real measurements need a GPU).
#[test]
fn bench_prints_a_table_row_per_workload() {
    let (stdout, rows) = bench_rows(&["--steps", "3"]);
    let names = [
        "op: conv3x3 320->320, [2,320,8,8], burn's conv2d",
        "op: conv3x3 320->320, [2,320,8,8], im2col + matmul",
        "op: attention core, [2,8,64,40], score chunks",
        "op: attention core, [2,8,64,40], burn's fused op",
        "UNet forward, batch 1",
        "UNet forward, batch 2",
        "VAE encode, 64 px",
        "VAE decode, 64 px",
        "guidance: truncated UNet forward + backward (move), step recompute",
        "guidance: truncated UNet forward + backward (move), lean",
        "guidance: truncated UNet forward + backward (move), flash",
        "guidance: truncated UNet forward + backward (move), autodiff tape",
        "DDIM inversion",
        "whole edit: move",
        "whole edit: drag",
        "whole edit: face_landmarks",
        "whole edit: appearance",
        "whole edit: paste",
        "second edit of the same photo",
    ];
    assert_eq!(rows.len(), names.len(), "{stdout}");
    for (row, name) in rows.iter().zip(names) {
        assert!(row.contains(name), "{row} should be {name}");
        let median: f64 = row
            .split('|')
            .nth(2)
            .expect("median")
            .trim()
            .parse()
            .expect("number");
        assert!(median > 0.0, "{row}");
    }
}

#[test]
fn bench_times_products_whole_and_split() {
    let (stdout, rows) = bench_rows(&[
        "--only",
        "op: product,batch 1",
        "--split-outputs",
        "1000000",
        "--products",
        "browser",
        "--skip-edits",
    ]);
    assert!(
        stdout.contains(
            "products: split below 1000000 outputs, the browser's fixed kernel, 1 warm-ups"
        ),
        "{stdout}"
    );
    // 4 resolutions (8x8 to 1x1 at 64 px) x 2 products x whole (tuned, the browser's kernel,
    // the three other unit routines) and 2, 4, 8 parts, then the batch-1 pass with the
    // threshold and with every product whole.
    assert_eq!(rows.len(), 66, "{stdout}");
    assert!(
        rows[0].contains(
            "op: product 320x2880 by 2880x64, batch 2 (conv3x3 320->320 at 8x8), whole |"
        ),
        "{stdout}"
    );
    assert!(
        rows[1].contains("(conv3x3 320->320 at 8x8), whole by the browser's kernel |"),
        "{stdout}"
    );
    assert!(
        rows[4].contains(
            "(conv3x3 320->320 at 8x8), whole by the double-buffered unit routine with the \
             smallest tiles |"
        ),
        "{stdout}"
    );
    assert!(
        rows[15].contains("(feed-forward out 1280->320 at 8x8), 8 parts"),
        "{stdout}"
    );
    assert!(rows[63].contains("at 1x1), 8 parts"), "{stdout}");
    assert!(rows[64].contains("UNet forward, batch 1") && !rows[64].contains("whole"));
    assert!(
        rows[65].contains("batch 1, 8x8 latent, products whole"),
        "{stdout}"
    );
}

#[test]
fn bench_only_runs_the_rows_it_names() {
    let (stdout, rows) = bench_rows(&["--steps", "2", "--only", "recompute"]);
    // "step recompute" and "flash (scores recomputed)"; not the tape, UNet or edit rows.
    assert_eq!(rows.len(), 2, "{stdout}");
    assert!(rows[0].contains("step recompute"), "{stdout}");
    assert!(rows[1].contains("flash"), "{stdout}");
    // Comma-separated alternatives; whole edits take their own run counts.
    let (stdout, rows) = bench_rows(&[
        "--steps",
        "2",
        "--only",
        "VAE decode, whole edit: drag,",
        "--edit-warmups",
        "0",
    ]);
    assert_eq!(rows.len(), 2, "{stdout}");
    assert!(rows[0].contains("VAE decode"), "{stdout}");
    assert!(rows[1].contains("whole edit: drag"), "{stdout}");
    assert!(stdout.contains("0 + 1 per whole edit"), "{stdout}");
}

/// Each whole edit's phase says the most the GPU pool reserved while it ran, read by a thread
/// of the bench's own in one untimed run after the timed ones (only that run's phase lines
/// have a peak), which starts from a pool whose free pages went back. The engine hands the
/// VAE's pages back before it reports the next phase, so in the browser's layout the
/// encoder's and the decoder's pages can only be seen while they run: their phases' peaks
/// are above what was reserved both as they began and once they were done (with readings
/// only at the phase changes they equal the larger of the two). The table's peak for the
/// edit covers every phase, so it is above what the pool kept after the edit, in both
/// layouts (the browser's pool reports no peaks of its own).
/// The sum of the MiB reserved by the size buckets a bench stderr line lists ("...; buckets (up
/// to MiB: buffers now/at most, MiB reserved/in use): 0.03: 4/9 0.1/0.0, ...; ..."), and how
/// many; `None` where it lists none.
fn buckets(line: &str) -> Option<(f64, usize)> {
    let list = line.split("MiB reserved/in use): ").nth(1)?;
    let list = list.split(';').next().unwrap_or_default();
    let held: Vec<f64> = list
        .split(", ")
        .map(|b| {
            let reserved = b
                .split_whitespace()
                .nth(2)
                .expect("a bucket: size: n/m r/u");
            reserved
                .split('/')
                .next()
                .and_then(|r| r.parse().ok())
                .expect(b)
        })
        .collect();
    Some((held.iter().sum(), held.len()))
}

#[test]
fn bench_reads_the_pools_peak_while_each_phase_runs() {
    if dragonedit::device::test_gpu().is_none() {
        return;
    }
    let mut largest = Vec::new();
    for pools in ["shared", "exclusive"] {
        let out = dragonedit()
            .args(["bench", "--tiny", "--resolution", "64", "--steps", "2"])
            .args(["--runs", "1", "--warmups", "0", "--pools", pools])
            .args(["--only", "whole edit: move"])
            .output()
            .expect("runs");
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(out.status.success(), "{stderr}");
        // "...: decoding took 0.34 s; reserved at most 40 MiB during it; pool now in use 20
        // MiB, reserved 28 MiB; ..."
        let mib_after = |line: &str, label: &str| -> f64 {
            let rest = &line[line.find(label).expect(label) + label.len()..];
            rest.split_whitespace()
                .next()
                .and_then(|n| n.parse().ok())
                .expect("a number")
        };
        let reserved_in = |label: &str| {
            let line = stderr.lines().find(|l| l.contains(label)).expect(label);
            mib_after(line, ", reserved ")
        };
        let mut at_start = reserved_in("pool before:");
        let mut phases = 0;
        let mut most_in_a_phase = 0.0f64;
        for line in stderr.lines().filter(|l| l.contains(" during it;")) {
            let most = mib_after(line, "reserved at most ");
            let now = mib_after(line, ", reserved ");
            assert!(most >= now.max(at_start), "{pools}: {line}");
            // In the shared layout the pool's pages have by then grown to the size the
            // first run outgrew them to, so the page the VAE works in can already be held when
            // its phase begins; the browser's layout allocates and frees it with the VAE.
            let vae = line.contains("encoding image took") || line.contains("decoding took");
            if vae && pools == "exclusive" {
                assert!(
                    most > now.max(at_start),
                    "{pools}: the VAE's pages went unseen: {line}"
                );
            }
            most_in_a_phase = most_in_a_phase.max(most);
            at_start = now;
            phases += 1;
            // The browser's layout lists its size buckets; their buffers and the pool's
            // persistent part (the weights, as before the edit) make up what is reserved, to
            // the rounding of the numbers printed.
            assert_eq!(
                buckets(line).is_some(),
                pools == "exclusive",
                "{pools}: {line}"
            );
            if let Some(held) = buckets(line) {
                let before = stderr
                    .lines()
                    .find(|l| l.contains("pool before:"))
                    .expect("before");
                let weights =
                    mib_after(before, ", reserved ") - buckets(before).unwrap_or_default().0;
                let slack = 1.0 + 0.05 * (held.1 + buckets(before).map_or(0, |b| b.1)) as f64;
                let sum = held.0 + weights;
                assert!(
                    (sum - now).abs() <= slack,
                    "{pools}: {sum} against {now}: {line}"
                );
            }
        }
        assert_eq!(phases, 5, "{pools}: {stderr}");
        // | name | median | fastest | peak reserved | largest buffer | heap |
        let row = stdout
            .lines()
            .find(|l| l.starts_with("| whole edit: move"))
            .expect("the edit's row");
        let peak: f64 = row
            .split('|')
            .nth(4)
            .and_then(|c| c.trim().parse().ok())
            .unwrap_or_else(|| panic!("{pools}: no peak in {row}"));
        // Whole MiB in the table against the phases' whole MiB: both rounded.
        assert!(peak >= most_in_a_phase - 0.5, "{pools}: {row}\n{stderr}");
        assert!(
            peak > reserved_in("pool after:"),
            "{pools}: {row}\n{stderr}"
        );
        largest.push(
            row.split('|')
                .nth(5)
                .and_then(|c| c.trim().parse::<f64>().ok())
                .unwrap_or_else(|| panic!("{pools}: no largest buffer in {row}")),
        );
    }
    // Every pool is read, so the browser's layout, which has no shared pages to report,
    // gives a size too (the weights' buffers alone hold several MiB). The same edit asks for
    // the same allocations in both layouts; only the first process autotunes, whose
    // candidates may ask for more.
    let [shared, exclusive] = [largest[0], largest[1]];
    assert!(exclusive >= 1.0, "{largest:?}");
    assert!(shared >= exclusive, "{largest:?}");
}

/// `--no-peak` leaves out the untimed run that reads the pool, for runs that compare times
/// only; without it a GPU row has a peak.
#[test]
fn bench_no_peak_skips_the_pools_run() {
    if dragonedit::device::test_gpu().is_none() {
        return;
    }
    for (flag, peak_shown) in [(None, true), (Some("--no-peak"), false)] {
        let out = dragonedit()
            .args(["bench", "--tiny", "--resolution", "64", "--runs", "1"])
            .args(["--warmups", "0", "--only", "VAE decode"])
            .args(flag)
            .output()
            .expect("runs");
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(out.status.success(), "{stderr}");
        let row = stdout
            .lines()
            .find(|l| l.starts_with("| VAE decode"))
            .expect("the row");
        let peak = row.split('|').nth(4).map(str::trim).expect("a peak cell");
        assert_eq!(peak.parse::<f64>().is_ok(), peak_shown, "{flag:?}: {row}");
        assert_eq!(
            stderr.contains("untimed run"),
            peak_shown,
            "{flag:?}: {stderr}"
        );
    }
}
