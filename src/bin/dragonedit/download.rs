//! Downloading a model folder from a base URL into the cache, resumably, with a progress bar
//! and SHA-256 checks where the manifest has them.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use indicatif::{ProgressBar, ProgressStyle};
use serde::Deserialize;
use sha2::{Digest, Sha256};

/// `dragonedit-manifest.json` at the base URL: the files to fetch, with sizes and hashes.
#[derive(Debug, Deserialize)]
struct Manifest {
    files: Vec<ManifestFile>,
}

#[derive(Debug, Deserialize, Clone)]
struct ManifestFile {
    path: String,
    #[serde(default)]
    sha256: Option<String>,
}

const MANIFEST: &str = "dragonedit-manifest.json";

/// Small files every SD 1.5 folder has.
const SMALL_FILES: &[&str] = &[
    "unet/config.json",
    "vae/config.json",
    "text_encoder/config.json",
    "scheduler/scheduler_config.json",
    "tokenizer/vocab.json",
    "tokenizer/merges.txt",
];

/// Weight files when there is no manifest: the fp16 variant first (half the download), then
/// the full-precision file.
const WEIGHT_CHOICES: &[&[&str]] = &[
    &[
        "unet/diffusion_pytorch_model.fp16.safetensors",
        "unet/diffusion_pytorch_model.safetensors",
    ],
    &[
        "vae/diffusion_pytorch_model.fp16.safetensors",
        "vae/diffusion_pytorch_model.safetensors",
    ],
    &[
        "text_encoder/model.fp16.safetensors",
        "text_encoder/model.safetensors",
    ],
];

fn cache_root(explicit: Option<&Path>) -> PathBuf {
    if let Some(dir) = explicit {
        return dir.to_path_buf();
    }
    if let Some(xdg) = std::env::var_os("XDG_CACHE_HOME") {
        return PathBuf::from(xdg).join("dragonedit");
    }
    match std::env::var_os("HOME") {
        Some(home) => PathBuf::from(home).join(".cache").join("dragonedit"),
        None => PathBuf::from(".dragonedit-cache"),
    }
}

/// A folder name for a URL: its readable part plus a short hash, so distinct URLs never collide.
fn folder_for(url: &str) -> String {
    let readable: String = url
        .trim_start_matches("https://")
        .trim_start_matches("http://")
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '.' || c == '-' {
                c
            } else {
                '_'
            }
        })
        .take(80)
        .collect();
    let hash = Sha256::digest(url.as_bytes());
    format!(
        "{readable}-{:02x}{:02x}{:02x}{:02x}",
        hash[0], hash[1], hash[2], hash[3]
    )
}

fn agent() -> ureq::Agent {
    ureq::AgentBuilder::new()
        .timeout_connect(std::time::Duration::from_secs(30))
        .build()
}

/// Downloads every file of the model at `base_url` (skipping those already complete) and
/// returns the local folder.
pub fn fetch_model(base_url: &str, cache_dir: Option<&Path>) -> Result<PathBuf> {
    let base = base_url.trim_end_matches('/');
    let dir = cache_root(cache_dir).join("models").join(folder_for(base));
    fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let agent = agent();
    let files = match agent.get(&format!("{base}/{MANIFEST}")).call() {
        Ok(resp) => {
            let manifest: Manifest = serde_json::from_reader(resp.into_reader())
                .with_context(|| format!("{base}/{MANIFEST} is not a valid manifest"))?;
            manifest.files
        }
        Err(ureq::Error::Status(404, _)) => default_files(&agent, base)?,
        Err(e) => bail!("cannot reach {base}: {e}. Check the URL and your connection"),
    };
    for file in &files {
        fetch_file(&agent, base, &dir, file)?;
    }
    Ok(dir)
}

fn default_files(agent: &ureq::Agent, base: &str) -> Result<Vec<ManifestFile>> {
    let mut files: Vec<ManifestFile> = SMALL_FILES
        .iter()
        .map(|p| ManifestFile {
            path: (*p).to_string(),
            sha256: None,
        })
        .collect();
    for choices in WEIGHT_CHOICES {
        let found = choices
            .iter()
            .find(|p| agent.head(&format!("{base}/{p}")).call().is_ok());
        match found {
            Some(p) => files.push(ManifestFile {
                path: (*p).to_string(),
                sha256: None,
            }),
            None => bail!("{base} has none of {}", choices.join(", ")),
        }
    }
    Ok(files)
}

/// Attempts per file before giving up; each later attempt resumes where the last one stopped.
const ATTEMPTS: u32 = 4;

fn fetch_file(agent: &ureq::Agent, base: &str, dir: &Path, file: &ManifestFile) -> Result<()> {
    if file.path.contains("..") || file.path.starts_with('/') {
        bail!("refusing manifest path {:?}", file.path);
    }
    let dest = dir.join(&file.path);
    if dest.is_file() {
        return Ok(());
    }
    if let Some(parent) = dest.parent() {
        fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
    }
    let part = dest.with_extension("part");
    let url = format!("{base}/{}", file.path);
    for attempt in 1..=ATTEMPTS {
        match transfer(agent, &url, &part, &file.path) {
            Ok(()) => break,
            Err(Transfer::Fatal(e)) => return Err(e),
            Err(Transfer::Interrupted(e)) if attempt == ATTEMPTS => {
                return Err(e.context(format!(
                    "gave up on {url} after {ATTEMPTS} attempts; run again to resume"
                )));
            }
            Err(Transfer::Interrupted(e)) => {
                let wait = std::time::Duration::from_millis(500 << attempt);
                eprintln!(
                    "{}: {e:#}; resuming in {:.0?} (attempt {} of {ATTEMPTS})",
                    file.path,
                    wait,
                    attempt + 1
                );
                std::thread::sleep(wait);
            }
        }
    }
    if let Some(expected) = &file.sha256 {
        let actual = sha256_file(&part)?;
        if !actual.eq_ignore_ascii_case(expected) {
            fs::remove_file(&part).ok();
            bail!(
                "{} failed its SHA-256 check (expected {expected}, got {actual}); the partial file was removed, run again to download it afresh",
                file.path
            );
        }
    }
    fs::rename(&part, &dest).with_context(|| format!("moving {} into place", dest.display()))?;
    Ok(())
}

/// Why one attempt at a file ended early: worth resuming (the connection dropped, the server
/// hiccuped) or not (the file is missing, the disk is full).
enum Transfer {
    Interrupted(anyhow::Error),
    Fatal(anyhow::Error),
}

/// One attempt: appends to `part` from where it ends (HTTP Range), or starts it afresh when the
/// server ignores the range.
fn transfer(agent: &ureq::Agent, url: &str, part: &Path, name: &str) -> Result<(), Transfer> {
    let have = fs::metadata(part).map(|m| m.len()).unwrap_or(0);
    let mut request = agent.get(url);
    if have > 0 {
        request = request.set("Range", &format!("bytes={have}-"));
    }
    let resp = match request.call() {
        Ok(resp) => resp,
        // The part is already whole (a crash after the last byte) or longer than the file:
        // start over rather than trust it.
        Err(ureq::Error::Status(416, _)) => {
            fs::remove_file(part).ok();
            return Err(Transfer::Interrupted(anyhow::anyhow!(
                "the server refused to resume at byte {have}"
            )));
        }
        Err(ureq::Error::Status(code, _)) if code >= 500 || code == 429 => {
            return Err(Transfer::Interrupted(anyhow::anyhow!(
                "{url} answered HTTP {code}"
            )));
        }
        Err(ureq::Error::Status(code, _)) => {
            return Err(Transfer::Fatal(anyhow::anyhow!(
                "{url} answered HTTP {code}; check the model URL"
            )));
        }
        Err(e) => return Err(Transfer::Interrupted(anyhow::anyhow!("{e}"))),
    };
    let resumed = resp.status() == 206 && content_range_start(&resp) == Some(have);
    let start = if resumed { have } else { 0 };
    let total = resp
        .header("Content-Length")
        .and_then(|l| l.parse::<u64>().ok())
        .map(|l| l + start);
    let fatal = |e: std::io::Error| {
        Transfer::Fatal(anyhow::anyhow!(
            "writing {}: {e} (is the disk full?); free some space and run again to resume",
            part.display()
        ))
    };
    let mut out = OpenOptions::new()
        .create(true)
        .write(true)
        .append(resumed)
        .truncate(!resumed)
        .open(part)
        .map_err(fatal)?;
    let bar = ProgressBar::new(total.unwrap_or(0));
    bar.set_style(
        ProgressStyle::with_template(
            "{msg} [{bar:40}] {bytes}/{total_bytes} {bytes_per_sec} (eta {eta})",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> "),
    );
    bar.set_message(name.to_string());
    bar.set_position(start);
    let mut reader = resp.into_reader();
    let mut buf = vec![0u8; 1 << 20];
    let mut written = start;
    loop {
        let n = match reader.read(&mut buf) {
            Ok(n) => n,
            Err(e) => {
                bar.abandon();
                return Err(Transfer::Interrupted(anyhow::anyhow!(
                    "connection lost at byte {written}: {e}"
                )));
            }
        };
        if n == 0 {
            break;
        }
        out.write_all(&buf[..n]).map_err(fatal)?;
        written += n as u64;
        bar.inc(n as u64);
    }
    out.flush().map_err(fatal)?;
    if let Some(total) = total.filter(|&t| t != written) {
        bar.abandon();
        return Err(Transfer::Interrupted(anyhow::anyhow!(
            "the transfer ended at byte {written} of {total}"
        )));
    }
    bar.finish();
    Ok(())
}

/// The first byte of a 206 answer (`Content-Range: bytes START-END/TOTAL`).
fn content_range_start(resp: &ureq::Response) -> Option<u64> {
    let range = resp.header("Content-Range")?.strip_prefix("bytes ")?;
    range.split('-').next()?.trim().parse().ok()
}

fn sha256_file(path: &Path) -> Result<String> {
    let mut f = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn distinct_urls_get_distinct_folders() {
        let a = folder_for("https://example.org/sd/resolve/abc");
        let b = folder_for("https://example.org/sd/resolve/abd");
        assert_ne!(a, b);
        assert!(a.starts_with("example.org_sd_resolve_abc-"));
    }
}
