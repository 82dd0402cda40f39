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
