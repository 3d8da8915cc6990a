//! Property-driven fuzzing of the three parsers that read what a technician, a field update
//! or a camera hands the daemon: the config, the manifest and the frame decoder. Inputs are
//! real files (the example config, a shipped manifest, a dataset JPEG and a PNG) with bytes
//! flipped, cut, duplicated or inserted; each parser must return `Ok` or an error, never panic
//! (a panic on the capture or reload thread loses alerts). CI runs the default case count;
//! `PROPTEST_CASES=100000 cargo test --release --test fuzz` runs a longer campaign.

use std::path::{Path, PathBuf};

use polypwatch::config::Config;
use polypwatch::manifest::Manifest;
use polypwatch::preprocess::decode_rgb;
use proptest::prelude::*;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn read(p: &str) -> Vec<u8> {
    std::fs::read(root().join(p)).unwrap()
}

/// One edit of a byte string.
#[derive(Debug, Clone)]
enum Edit {
    Flip(usize, u8),
    Cut(usize),
    Insert(usize, Vec<u8>),
    Repeat(usize, usize),
}

fn edit() -> impl Strategy<Value = Edit> {
    prop_oneof![
        (any::<usize>(), any::<u8>()).prop_map(|(i, b)| Edit::Flip(i, b)),
        any::<usize>().prop_map(Edit::Cut),
        (any::<usize>(), prop::collection::vec(any::<u8>(), 1..16))
            .prop_map(|(i, v)| Edit::Insert(i, v)),
        (any::<usize>(), 1usize..64).prop_map(|(i, n)| Edit::Repeat(i, n)),
    ]
}

fn apply(mut v: Vec<u8>, edits: &[Edit]) -> Vec<u8> {
    for e in edits {
        if v.is_empty() {
            break;
        }
        let at = |i: usize| i % v.len();
        match e {
            Edit::Flip(i, b) => {
                let i = at(*i);
                v[i] ^= b | 1;
            }
            Edit::Cut(i) => v.truncate(at(*i)),
            Edit::Insert(i, bytes) => {
                let i = at(*i);
                v.splice(i..i, bytes.iter().copied());
            }
            Edit::Repeat(i, n) => {
                let i = at(*i);
                let end = (i + n).min(v.len());
                let chunk = v[i..end].to_vec();
                v.splice(end..end, chunk);
            }
        }
    }
    v
}

/// TOML keys and values that parse, to reach validation and not only the tokenizer.
fn toml_line() -> impl Strategy<Value = String> {
    let key = prop::sample::select(vec![
        "fps",
        "threads",
        "quota_mib",
        "raise_after",
        "clear_after",
        "min_area",
        "alert_score",
        "pixel_threshold",
        "threshold",
        "mean",
        "std",
        "height",
        "width",
        "min_iou",
        "bytes",
        "loop",
        "kind",
    ]);
    let value = prop::sample::select(vec![
        "0",
        "-1",
        "1e-300",
        "1e300",
        "nan",
        "inf",
        "-inf",
        "18446744073709551615",
        "9223372036854775808",
        "0.5",
        "true",
        "\"\"",
        "\"v4l2\"",
        "[]",
        "[1.0, 2.0, 3.0, 4.0]",
        "[nan, 0.5, 0.5]",
        "{}",
    ]);
    (key, value).prop_map(|(k, v)| format!("{k} = {v}"))
}

/// Inserts `line` after the `n`-th section header of `text`.
fn with_line(text: &str, n: usize, line: &str) -> String {
    let headers: Vec<usize> = text
        .match_indices("\n[")
        .map(|(i, _)| i + 1)
        .collect::<Vec<_>>();
    if headers.is_empty() {
        return format!("{line}\n{text}");
    }
    let h = headers[n % headers.len()];
    let eol = text[h..].find('\n').map_or(text.len(), |e| h + e + 1);
    format!("{}{line}\n{}", &text[..eol], &text[eol..])
}

// proptest's default of 256 cases each; PROPTEST_CASES overrides it.
proptest! {
    #[test]
    fn config_bytes_never_panic(edits in prop::collection::vec(edit(), 1..6)) {
        let bytes = apply(read("polypwatch.example.toml"), &edits);
        let _ = Config::parse(&String::from_utf8_lossy(&bytes), Path::new("fuzz.toml"));
    }

    #[test]
    fn config_values_never_panic(n in 0usize..16, line in toml_line()) {
        let text = String::from_utf8(read("polypwatch.example.toml")).unwrap();
        let _ = Config::parse(&with_line(&text, n, &line), Path::new("fuzz.toml"));
    }

    #[test]
    fn manifest_bytes_never_panic(edits in prop::collection::vec(edit(), 1..6)) {
        let bytes = apply(read("models/polypwatch-edge-int8.toml"), &edits);
        let _ = Manifest::parse(&String::from_utf8_lossy(&bytes), Path::new("fuzz.toml"));
    }

    #[test]
    fn manifest_values_never_panic(n in 0usize..16, line in toml_line()) {
        let text = String::from_utf8(read("models/polypwatch-edge-int8.toml")).unwrap();
        let _ = Manifest::parse(&with_line(&text, n, &line), Path::new("fuzz.toml"));
    }

    #[test]
    fn jpeg_frames_never_panic(edits in prop::collection::vec(edit(), 1..4)) {
        let bytes = apply(read("demo/clip/frame_00000.jpg"), &edits);
        let _ = decode_rgb(&bytes, "fuzz.jpg");
    }

    #[test]
    fn png_frames_never_panic(edits in prop::collection::vec(edit(), 1..4)) {
        let bytes = apply(read("tests/fixtures/model/tiny-f32.selftest.png"), &edits);
        let _ = decode_rgb(&bytes, "fuzz.png");
    }
}
