//! Per-stage latency of the frame pipeline (decode, preprocess, inference, post-process).

use std::path::Path;
use std::time::Instant;

use serde::Serialize;

use crate::detect::Detector;
use crate::model::{ModelError, Segmenter};
use crate::preprocess::{self, PreprocessError};

/// Latency quantiles of one stage, in milliseconds.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Quantiles {
    /// Median.
    pub p50: f64,
    /// 95th percentile.
    pub p95: f64,
    /// 99th percentile.
    pub p99: f64,
}

impl Quantiles {
    /// Quantiles of a set of samples (nearest rank).
    pub fn of(samples: &mut [f64]) -> Self {
        samples.sort_by(f64::total_cmp);
        let q = |p: f64| {
            if samples.is_empty() {
                0.0
            } else {
                samples[((samples.len() - 1) as f64 * p).round() as usize]
            }
        };
        Quantiles {
            p50: q(0.5),
            p95: q(0.95),
            p99: q(0.99),
        }
    }
}

/// Bench results.
#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    /// Frames timed.
    pub frames: usize,
    /// Inference threads.
    pub threads: usize,
    /// JPEG decode.
    pub decode: Quantiles,
    /// Resize and normalise.
    pub preprocess: Quantiles,
    /// tract, within the pipeline (a frame decoded and preprocessed between two runs).
    pub inference: Quantiles,
    /// tract alone, runs back to back over the first 32 frames preprocessed beforehand (after
    /// 3 warm-up runs): the protocol `bench/ort_bench.py` times ONNX Runtime with.
    pub inference_back_to_back: Quantiles,
    /// Sigmoid, threshold, components.
    pub postprocess: Quantiles,
    /// All four stages.
    pub total: Quantiles,
    /// Frames per second at the median total (stages run back to back).
    pub fps: f64,
    /// Peak resident memory, MiB (VmHWM).
    pub peak_rss_mib: f64,
}

/// Errors of a bench run.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    /// A frame could not be decoded.
    #[error(transparent)]
    Frame(#[from] PreprocessError),
    /// The model failed.
    #[error(transparent)]
    Model(#[from] ModelError),
}

/// Uses `n` threads for tract's matrix products (1 = single-threaded).
pub fn set_threads(n: usize) {
    if n > 1 {
        tract_linalg::multithread::set_default_executor(
            tract_linalg::multithread::Executor::multithread(n),
        );
    }
}

/// Peak resident set size of this process in MiB, from /proc (0 where unavailable).
pub fn peak_rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse::<f64>().ok())
        })
        .map_or(0.0, |kib| kib / 1024.0)
}

/// Frames [`bench`] preprocesses up front for its back-to-back inference runs (as many as
/// `bench/ort_bench.py` loads).
const BACK_TO_BACK_FRAMES: usize = 32;

/// Times `frames` passes over the JPEG/PNG files (cycled), after 3 warm-up frames; then
/// `frames` inference runs back to back.
pub fn bench(
    seg: &Segmenter,
    files: &[&Path],
    frames: usize,
    threads: usize,
) -> Result<BenchReport, BenchError> {
    let bytes: Vec<Vec<u8>> = files
        .iter()
        .map(|p| {
            std::fs::read(p).map_err(|source| PreprocessError::Read {
                path: p.to_path_buf(),
                error: source,
            })
        })
        .collect::<Result<_, _>>()?;
    let r = &seg.manifest().preprocess;
    let det = Detector::new(
        seg.manifest().detect_config(),
        seg.manifest().output.threshold,
    );
    // On one of tract's threads for the whole loop, as the daemon's inference thread is: each
    // frame then starts without handing the run to the pool and waiting for it back.
    let t = crate::accel::on_tract_threads(|| -> Result<_, BenchError> {
        let mut t = [vec![], vec![], vec![], vec![], vec![]];
        for i in 0..frames + 3 {
            let b = &bytes[i % bytes.len()];
            let t0 = Instant::now();
            let img = preprocess::decode_rgb(b, &files[i % files.len()].display().to_string())?;
            let t1 = Instant::now();
            let x = r.tensor_from_rgb(&img);
            let t2 = Instant::now();
            let mut logits = seg.run(&x)?;
            let t3 = Instant::now();
            let mask = det.mask(&mut logits, r.width, r.height);
            std::hint::black_box(det.detect(&logits, &mask));
            let t4 = Instant::now();
            if i >= 3 {
                let ms = |a: Instant, b: Instant| (b - a).as_secs_f64() * 1e3;
                for (k, v) in [ms(t0, t1), ms(t1, t2), ms(t2, t3), ms(t3, t4), ms(t0, t4)]
                    .into_iter()
                    .enumerate()
                {
                    t[k].push(v);
                }
            }
        }
        // The same frames as tensors first, then only inference, as ONNX Runtime is timed.
        let inputs = bytes
            .iter()
            .zip(files)
            .take(BACK_TO_BACK_FRAMES)
            .map(|(b, f)| {
                Ok(r.tensor_from_rgb(&preprocess::decode_rgb(b, &f.display().to_string())?))
            })
            .collect::<Result<Vec<_>, BenchError>>()?;
        let mut hot = Vec::with_capacity(frames);
        for i in 0..frames + 3 {
            let t0 = Instant::now();
            std::hint::black_box(seg.run(&inputs[i % inputs.len()])?);
            if i >= 3 {
                hot.push(t0.elapsed().as_secs_f64() * 1e3);
            }
        }
        Ok((t, hot))
    })?;
    let ([mut d, mut p, mut inf, mut post, mut tot], mut hot) = t;
    let total = Quantiles::of(&mut tot);
    Ok(BenchReport {
        frames,
        threads,
        decode: Quantiles::of(&mut d),
        preprocess: Quantiles::of(&mut p),
        inference: Quantiles::of(&mut inf),
        inference_back_to_back: Quantiles::of(&mut hot),
        postprocess: Quantiles::of(&mut post),
        total,
        fps: 1e3 / total.p50.max(1e-9),
        peak_rss_mib: peak_rss_mib(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture(p: &str) -> std::path::PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join(p)
    }

    /// Every stage and the back-to-back inference are timed, over real frames and the shipped
    /// model (what the figures are, not how fast: timings belong to benchmarks).
    #[test]
    fn times_every_stage_of_real_frames() {
        let seg = Segmenter::load(&fixture("models/polypwatch-edge-int8.toml")).unwrap();
        let dir = fixture("tests/fixtures/kvasir-mini/images");
        let mut files: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        files.sort();
        let refs: Vec<&Path> = files.iter().take(2).map(|p| p.as_path()).collect();
        let r = bench(&seg, &refs, 3, 1).unwrap();
        assert_eq!(r.frames, 3);
        for q in [
            r.decode,
            r.preprocess,
            r.inference,
            r.inference_back_to_back,
            r.postprocess,
            r.total,
        ] {
            assert!(q.p50 > 0.0 && q.p50 <= q.p95 && q.p95 <= q.p99, "{r:?}");
        }
        assert!(r.total.p50 >= r.inference.p50, "{r:?}");
    }

    /// A frame that is not an image ends the run with an error naming it.
    #[test]
    fn corrupt_frame_is_an_error_naming_it() {
        let seg = Segmenter::load(&fixture("models/polypwatch-edge-int8.toml")).unwrap();
        let tmp = tempfile::tempdir().unwrap();
        let bad = tmp.path().join("frame.jpg");
        std::fs::write(&bad, b"\xff\xd8 not a jpeg").unwrap();
        let err = bench(&seg, &[bad.as_path()], 1, 1).unwrap_err();
        assert!(matches!(err, BenchError::Frame(_)), "{err}");
        assert!(err.to_string().contains("frame.jpg"), "{err}");
    }
}
