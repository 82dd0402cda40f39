//! The CLIP tokenizer against ids from the reference `CLIPTokenizer` (transformers 4.30),
//! using the real 49408-token vocabulary of tests/fixtures/tiny-sd/tokenizer.

mod common;

use dragonedit::model::tokenizer::{CONTEXT_LENGTH, ClipTokenizer};

fn tokenizer() -> ClipTokenizer {
    let dir = common::tiny_model_dir().join("tokenizer");
    let vocab = std::fs::read_to_string(dir.join("vocab.json")).expect("vocab");
    let merges = std::fs::read_to_string(dir.join("merges.txt")).expect("merges");
    ClipTokenizer::from_files(&vocab, &merges).expect("tokenizer loads")
}

fn padded(ids: &[u32]) -> Vec<u32> {
    let mut v = ids.to_vec();
    v.resize(CONTEXT_LENGTH, 49407);
    v
}

#[test]
fn known_prompts_match_clip_tokenizer() {
    let t = tokenizer();
    // Ids from tests/fixtures/tiny-sd/README.md (checked there with the slow CLIPTokenizer).
    assert_eq!(
        t.encode("a photo of a cat"),
        padded(&[49406, 320, 1125, 539, 320, 2368, 49407])
    );
    assert_eq!(
        t.encode("a photo of an astronaut riding a horse on mars"),
        padded(&[
            49406, 320, 1125, 539, 550, 18376, 6765, 320, 4558, 525, 7496, 49407
        ])
    );
    // Case and extra whitespace do not change the ids (lower-casing and whitespace_clean).
    assert_eq!(
        t.encode("  A Photo   of a CAT "),
        t.encode("a photo of a cat")
    );
}

#[test]
fn fixture_prompts_match_reference_ids() {
    let t = tokenizer();
    let cases = [
        (
            "move/token_ids.json",
            vec!["a photo of a red ball on the table"],
        ),
        (
            "prompts/appearance.json",
            vec![
                "a photo of a red ball on the table",
                "a photo of a yellow star",
            ],
        ),
        (
            "prompts/paste.json",
            vec![
                "a photo of a yellow star on the table",
                "a photo of a yellow star",
            ],
        ),
        (
            "prompts/face_landmark.json",
            vec!["a photo of a human face"],
        ),
    ];
    for (file, inversion_prompts) in cases {
        let json: serde_json::Value =
            serde_json::from_slice(&std::fs::read(common::fixtures().join(file)).expect("file"))
                .expect("json");
        let ids = |v: &serde_json::Value| -> Vec<u32> {
            v.as_array()
                .expect("list")
                .iter()
                .map(|x| x.as_u64().expect("id") as u32)
                .collect()
        };
        assert_eq!(t.encode(""), ids(&json["uncond"]), "{file}: uncond");
        assert_eq!(
            t.encode(inversion_prompts[0]),
            ids(&json["cond"]),
            "{file}: cond"
        );
        let rows = json["inversion"].as_array().expect("rows");
        for (row, prompt) in rows.iter().zip(&inversion_prompts) {
            assert_eq!(t.encode(prompt), ids(row), "{file}: {prompt}");
        }
    }
}

#[test]
fn punctuation_numbers_and_long_prompts() {
    let t = tokenizer();
    // Digits split one per token; punctuation runs stay together (CLIP's pattern).
    let ids = t.tokens("2024, wow!!");
    let vocab: serde_json::Value = serde_json::from_slice(
        &std::fs::read(common::tiny_model_dir().join("tokenizer/vocab.json")).expect("vocab"),
    )
    .expect("json");
    let id = |s: &str| vocab[s].as_u64().expect("in vocab") as u32;
    assert_eq!(
        ids,
        vec![
            id("2</w>"),
            id("0</w>"),
            id("2</w>"),
            id("4</w>"),
            id(",</w>"),
            id("wow</w>"),
            id("!!</w>")
        ]
    );
    // Longer prompts are cut to 75 tokens plus start and end.
    let long = t.encode(&"cat ".repeat(200));
    assert_eq!(long.len(), CONTEXT_LENGTH);
    assert_eq!(long[0], 49406);
    assert_eq!(long[76], 49407);
    assert!(long[1..76].iter().all(|&x| x == long[1]));
}
