//! `dragonedit edit`: runs an edit spec on a photo and writes the result, and with `--trace`
//! every intermediate tensor in the layout of the reference fixtures (tests/fixtures/README.md).

use pollster::block_on;
use std::io::Write;
use std::path::{Path, PathBuf};

use ::image::RgbImage;
use anyhow::{Context, Result};
use burn::tensor::Tensor;
use dragonedit::edit::engine::Trace;
use dragonedit::edit::{BankPolicy, EditSpec, Editor, EngineOptions, Fidelity};
use dragonedit::image;

use crate::app::{Bank, EditArgs, ModelArgs};
use crate::run::{Bar, load, npy_bytes, read_photo, read_values};

/// Writes `bytes` to `path` through a temporary file, so a failure never leaves half a file.
fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = path.with_extension("partial");
    std::fs::write(&tmp, bytes).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

pub fn edit(model: &ModelArgs, args: &EditArgs) -> Result<()> {
    let text = std::fs::read_to_string(&args.spec)
        .with_context(|| format!("reading the edit spec {}", args.spec.display()))?;
    let mut spec = EditSpec::from_json(&text).with_context(|| args.spec.display().to_string())?;
    if let Some(r) = args.resolution {
        spec.resolution = r;
    }
    if let Some(s) = args.steps {
        spec.steps = s;
    }
    let base = args
        .spec
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default();
    let photo = read_photo(&args.image)?;
    let reference_path = args
        .reference
        .clone()
        .or_else(|| spec.reference().map(|r| base.join(r)));
    let reference = reference_path.as_deref().map(read_photo).transpose()?;
    let edit = spec
        .resolve(photo.clone(), reference, &mut |name| {
            let path = base.join(name);
            std::fs::read(&path).map_err(|source| dragonedit::Error::Io { path, source })
        })
        .with_context(|| args.spec.display().to_string())?;

    let mut bar = Bar::new();
    let sd = load(model, &mut bar)?;
    let options = EngineOptions {
        bank: match args.bank {
            Bank::Recompute => BankPolicy::Recompute,
            Bank::Store => BankPolicy::Store,
        },
        fidelity: Fidelity {
            reference_quirks: args.reference_quirks,
        },
        gradients: args.gradients.into(),
    };
    let editor = Editor::new(&sd, options);
    let mut trace = args.trace.as_ref().map(|_| Trace::default());
    let out = block_on(editor.run(&edit, trace.as_mut(), &mut |p| bar.report(p)))?;
    drop(bar);

    let (w0, h0) = photo.dimensions();
    let result = image::resized(&out.image, w0, h0);
    write_atomic(&args.out, &image::encode_png(&result)?)?;
    println!("wrote {}", args.out.display());
    if let (Some(dir), Some(trace)) = (&args.trace, trace) {
        write_trace(dir, &trace, &out.image, out.final_latent)?;
        println!("wrote the trace to {}", dir.display());
    }
    Ok(())
}

fn tensor_npy<const D: usize>(t: Tensor<D>) -> Result<Vec<u8>> {
    let (shape, values) = read_values(t)?;
    npy_bytes(&shape, &values)
}

fn stacked(ts: &[Tensor<4>]) -> Result<Vec<u8>> {
    tensor_npy(Tensor::stack::<5>(ts.to_vec(), 0))
}

fn write_trace(
    dir: &PathBuf,
    trace: &Trace,
    output: &RgbImage,
    final_latent: Tensor<4>,
) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let file = |name: &str| dir.join(name);
    if let Some(z0) = trace.inversion_latents.first() {
        write_atomic(&file("vae_latent.npy"), &tensor_npy(z0.clone())?)?;
    }
    write_atomic(
        &file("inversion_latents.npy"),
        &stacked(&trace.inversion_latents)?,
    )?;
    write_atomic(&file("step_latents.npy"), &stacked(&trace.step_latents)?)?;
    write_atomic(&file("eps_cfg.npy"), &stacked(&trace.eps_cfg)?)?;
    if !trace.guidance.is_empty() {
        write_atomic(&file("guidance.npy"), &stacked(&trace.guidance)?)?;
    }
    write_atomic(&file("final_latent.npy"), &tensor_npy(final_latent)?)?;
    if let Some(t) = &trace.text_embeddings {
        write_atomic(&file("text_embeddings.npy"), &tensor_npy(t.clone())?)?;
    }
    if let Some(t) = &trace.inversion_text_embeddings {
        write_atomic(
            &file("inversion_text_embeddings.npy"),
            &tensor_npy(t.clone())?,
        )?;
    }
    write_atomic(&file("output.png"), &image::encode_png(output)?)?;
    if let Some(first) = &trace.first_step {
        let mut members: Vec<(String, Vec<u8>)> = vec![
            ("latent".into(), tensor_npy(first.latent.clone())?),
            ("latent_ref".into(), tensor_npy(first.latent_ref.clone())?),
            ("eps_uncond".into(), tensor_npy(first.eps_uncond.clone())?),
            ("eps_text".into(), tensor_npy(first.eps_text.clone())?),
            (
                "guidance".into(),
                tensor_npy(first.guidance.guidance.clone())?,
            ),
            ("g_edit".into(), tensor_npy(first.guidance.g_edit.clone())?),
            ("E_edit".into(), npy_bytes(&[], &[first.guidance.e_edit])?),
        ];
        if let Some(gc) = &first.guidance.g_content {
            members.push(("g_content".into(), tensor_npy(gc.clone())?));
            members.push((
                "E_content".into(),
                npy_bytes(&[], &[first.guidance.e_content])?,
            ));
        }
        for (level, (generated, reference, replace)) in first.guidance.features.iter().enumerate() {
            let n = level + 1;
            members.push((format!("feat_gen_up{n}"), tensor_npy(generated.clone())?));
            members.push((format!("feat_ref_up{n}"), tensor_npy(reference.clone())?));
            if let Some(r) = replace {
                members.push((format!("feat_ref_replace_up{n}"), tensor_npy(r.clone())?));
            }
        }
        for (name, mask) in &first.masks {
            members.push((
                name.to_string(),
                npy_bytes(&[mask.h, mask.w], &mask.to_f32())?,
            ));
        }
        write_atomic(&file("first_guided_step.npz"), &npz_bytes(&members)?)?;
    }
    let energies: Vec<serde_json::Value> = trace
        .energies
        .iter()
        .enumerate()
        .map(|(step, (e, c))| {
            let num = |v: f32| {
                if v.is_finite() {
                    serde_json::json!(v)
                } else {
                    serde_json::Value::Null
                }
            };
            serde_json::json!({"step": step, "E_edit": num(*e), "E_content": num(*c)})
        })
        .collect();
    let summary = serde_json::json!({
        "energies_all_guided_steps": energies,
        "memory_bank_bytes": trace.bank_bytes,
    });
    write_atomic(
        &file("trace.json"),
        serde_json::to_string_pretty(&summary)?.as_bytes(),
    )?;
    Ok(())
}

/// A plain (stored, uncompressed) zip of `.npy` members, as numpy's `savez`.
fn npz_bytes(members: &[(String, Vec<u8>)]) -> Result<Vec<u8>> {
    let mut zip = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    let options =
        zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
    for (name, bytes) in members {
        zip.start_file(format!("{name}.npy"), options)?;
        zip.write_all(bytes)?;
    }
    Ok(zip.finish()?.into_inner())
}
