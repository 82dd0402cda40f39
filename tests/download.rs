//! `--model URL` end to end against a local HTTP server that serves the tiny model and can
//! misbehave: a connection dropped mid-file, a wrong hash, a missing file.

mod common;

use std::collections::HashSet;
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::{Arc, Mutex};

use sha2::{Digest, Sha256};

const FILES: &[&str] = &[
    "unet/config.json",
    "vae/config.json",
    "text_encoder/config.json",
    "scheduler/scheduler_config.json",
    "tokenizer/vocab.json",
    "tokenizer/merges.txt",
    "unet/diffusion_pytorch_model.safetensors",
    "vae/diffusion_pytorch_model.safetensors",
    "text_encoder/model.safetensors",
];
const UNET: &str = "unet/diffusion_pytorch_model.safetensors";
const VAE: &str = "vae/diffusion_pytorch_model.safetensors";

/// One request as the server saw it: the path and the Range header, if any.
type Log = Arc<Mutex<Vec<(String, Option<String>)>>>;

struct Server {
    base: String,
    log: Log,
}

/// Serves `tests/fixtures/tiny-sd` plus `manifest` at 127.0.0.1. The first plain GET of each
/// path in `drop_once` sends the headers and half the body, then closes the connection.
fn serve(manifest: String, drop_once: &[&str]) -> Server {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let base = format!("http://{}/sd", listener.local_addr().expect("addr"));
    let log: Log = Arc::default();
    let seen = log.clone();
    let mut to_drop: HashSet<String> = drop_once.iter().map(|p| p.to_string()).collect();
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            if let Some((path, range)) = answer(stream, &manifest, &mut to_drop) {
                seen.lock().expect("log").push((path, range));
            }
        }
    });
    Server { base, log }
}

fn answer(
    stream: TcpStream,
    manifest: &str,
    to_drop: &mut HashSet<String>,
) -> Option<(String, Option<String>)> {
    let mut reader = BufReader::new(stream.try_clone().ok()?);
    let mut line = String::new();
    reader.read_line(&mut line).ok()?;
    let path = line.split_whitespace().nth(1)?.trim_start_matches("/sd/");
    let path = path.to_string();
    let mut range = None;
    loop {
        let mut header = String::new();
        reader.read_line(&mut header).ok()?;
        if header.trim().is_empty() {
            break;
        }
        if let Some((name, value)) = header.split_once(':')
            && name.eq_ignore_ascii_case("range")
        {
            range = Some(value.trim().to_string());
        }
    }
    let body = if path == "dragonedit-manifest.json" {
        Some(manifest.as_bytes().to_vec())
    } else if FILES.contains(&path.as_str()) {
        std::fs::read(common::tiny_model_dir().join(&path)).ok()
    } else {
        None
    };
    let mut out = stream;
    let Some(body) = body else {
        let _ = out
            .write_all(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
        return Some((path, range));
    };
    let start: usize = range
        .as_deref()
        .and_then(|r| r.strip_prefix("bytes="))
        .and_then(|r| r.trim_end_matches('-').parse().ok())
        .unwrap_or(0);
    let head = if start > 0 {
        format!(
            "HTTP/1.1 206 Partial Content\r\nContent-Length: {}\r\nContent-Range: bytes {start}-{}/{}\r\nConnection: close\r\n\r\n",
            body.len() - start,
            body.len() - 1,
            body.len()
        )
    } else {
        format!(
            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            body.len()
        )
    };
    let _ = out.write_all(head.as_bytes());
    let end = if start == 0 && to_drop.remove(&path) {
        body.len() / 2
    } else {
        body.len()
    };
    let _ = out.write_all(&body[start..end]);
    let _ = out.shutdown(std::net::Shutdown::Both);
    Some((path, range))
}

fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The manifest of the tiny model, with `wrong_hash` given a hash that cannot match.
fn manifest(wrong_hash: Option<&str>) -> String {
    let files: Vec<serde_json::Value> = FILES
        .iter()
        .map(|p| {
            let bytes = std::fs::read(common::tiny_model_dir().join(p)).expect("fixture");
            let sha = if Some(*p) == wrong_hash {
                "0".repeat(64)
            } else {
                sha256_hex(&bytes)
            };
            serde_json::json!({ "path": p, "sha256": sha })
        })
        .collect();
    serde_json::json!({ "files": files }).to_string()
}

fn cache_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("dragonedit-dl-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

fn fetch(server: &Server, cache: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_dragonedit"))
        .args(["fetch", "--url", &server.base, "--cache-dir"])
        .arg(cache)
        .output()
        .expect("runs")
}

fn requests(server: &Server) -> Vec<(String, Option<String>)> {
    server.log.lock().expect("log").clone()
}

#[test]
fn a_dropped_download_resumes_and_the_cached_model_runs_offline() {
    let server = serve(manifest(None), &[UNET]);
    let cache = cache_dir("resume");
    let out = fetch(&server, &cache);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "fetch failed: {stderr}");
    assert!(
        stderr.contains("resuming"),
        "the retry is reported: {stderr}"
    );

    let folder = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    for p in FILES {
        let got = std::fs::read(folder.join(p)).expect("downloaded");
        let want = std::fs::read(common::tiny_model_dir().join(p)).expect("fixture");
        assert!(got == want, "{p} arrived intact");
    }
    let unet_len = std::fs::metadata(common::tiny_model_dir().join(UNET))
        .expect("fixture")
        .len();
    let unet_requests: Vec<Option<String>> = requests(&server)
        .into_iter()
        .filter(|(p, _)| p == UNET)
        .map(|(_, r)| r)
        .collect();
    assert_eq!(
        unet_requests,
        vec![None, Some(format!("bytes={}-", unet_len / 2))],
        "the second request resumes where the first stopped"
    );

    // A model run on the same URL finds every file cached: only the manifest is fetched.
    let before = requests(&server).len();
    let png = cache.join("out.png");
    let run = Command::new(env!("CARGO_BIN_EXE_dragonedit"))
        .args(["generate", "--cpu", "--model", &server.base, "--steps", "1"])
        .args(["--width", "64", "--height", "64", "--prompt", "a cat"])
        .arg("--cache-dir")
        .arg(&cache)
        .arg("--out")
        .arg(&png)
        .output()
        .expect("runs");
    assert!(
        run.status.success(),
        "generate failed: {}",
        String::from_utf8_lossy(&run.stderr)
    );
    let later: Vec<String> = requests(&server)[before..]
        .iter()
        .map(|(p, _)| p.clone())
        .collect();
    assert_eq!(later, vec!["dragonedit-manifest.json".to_string()]);
    let _ = std::fs::remove_dir_all(&cache);
}

#[test]
fn a_file_failing_its_hash_is_removed_and_named() {
    let server = serve(manifest(Some(VAE)), &[]);
    let cache = cache_dir("hash");
    let out = fetch(&server, &cache);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains(VAE) && stderr.contains("SHA-256"),
        "names the file and the check: {stderr}"
    );
    let leftovers: Vec<PathBuf> = walk(&cache)
        .into_iter()
        .filter(|p| p.to_string_lossy().contains("vae/diffusion_pytorch_model"))
        .collect();
    assert!(
        leftovers.is_empty(),
        "nothing of the bad file is kept: {leftovers:?}"
    );
    let _ = std::fs::remove_dir_all(&cache);
}

#[test]
fn a_missing_file_fails_at_once_with_its_url() {
    let mut manifest: serde_json::Value =
        serde_json::from_str(&manifest(None)).expect("valid manifest");
    manifest["files"][0]["path"] = "unet/missing.json".into();
    let server = serve(manifest.to_string(), &[]);
    let cache = cache_dir("missing");
    let out = fetch(&server, &cache);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("unet/missing.json") && stderr.contains("404"),
        "says which URL and what the server answered: {stderr}"
    );
    let tries = requests(&server)
        .iter()
        .filter(|(p, _)| p == "unet/missing.json")
        .count();
    assert_eq!(tries, 1, "a 404 is not retried");
    let _ = std::fs::remove_dir_all(&cache);
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    if let Ok(entries) = std::fs::read_dir(dir) {
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() {
                found.extend(walk(&path));
            } else {
                found.push(path);
            }
        }
    }
    found
}
