//! Where the frame pipeline's time goes: per-frame stage times and their running summary
//! (frame rate, capture-to-decision latency quantiles, mean of each stage).

use std::time::Instant;

use serde::Serialize;

/// Milliseconds one frame spent in each stage.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Stages {
    /// Buffer to RGB: JPEG decoding or pixel-format conversion (capture thread).
    pub decode: f64,
    /// Resize and normalise to the model's input (capture thread).
    pub preprocess: f64,
    /// Ready, waiting for the processing thread to finish the previous frame.
    pub wait: f64,
    /// The model.
    pub inference: f64,
    /// Mask, components, score and the alert decision.
    pub postprocess: f64,
}

impl Stages {
    fn add(&mut self, o: &Stages, k: f64) {
        self.decode += k * o.decode;
        self.preprocess += k * o.preprocess;
        self.wait += k * o.wait;
        self.inference += k * o.inference;
        self.postprocess += k * o.postprocess;
    }
}

/// A summary of the frames recorded by [`Timing`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct TimingReport {
    /// Frames recorded.
    pub frames: u64,
    /// Frames per second between the first and the last decision.
    pub fps: f64,
    /// Median time from capture to decision, in milliseconds.
    pub latency_p50_ms: f64,
    /// 95th percentile of the same.
    pub latency_p95_ms: f64,
    /// Largest of the same.
    pub latency_max_ms: f64,
    /// Mean time per stage.
    pub mean: Stages,
}

impl std::fmt::Display for TimingReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let m = &self.mean;
        write!(
            f,
            "{:.1} fps, capture to decision {:.0} ms median, {:.0} ms p95, {:.0} ms max; \
             mean ms: decode {:.1}, preprocess {:.1}, wait {:.1}, inference {:.1}, post {:.1}",
            self.fps,
            self.latency_p50_ms,
            self.latency_p95_ms,
            self.latency_max_ms,
            m.decode,
            m.preprocess,
            m.wait,
            m.inference,
            m.postprocess
        )
    }
}

/// Latency histogram resolution and range: 0.1 ms buckets up to 2 s (the last bucket holds
/// everything slower), so a daemon running for months keeps constant memory.
const BUCKET_MS: f64 = 0.1;
const BUCKETS: usize = 20_000;

/// Accumulates per-frame stage times and capture-to-decision latencies.
#[derive(Debug, Clone)]
pub struct Timing {
    frames: u64,
    sums: Stages,
    histogram: Vec<u32>,
    max_ms: f64,
    first: Option<Instant>,
    last: Option<Instant>,
}

impl Default for Timing {
    fn default() -> Self {
        Timing {
            frames: 0,
            sums: Stages::default(),
            histogram: vec![0; BUCKETS],
            max_ms: 0.0,
            first: None,
            last: None,
        }
    }
}

impl Timing {
    /// Records one frame decided at `at`, `latency_ms` after its capture.
    pub fn record(&mut self, stages: &Stages, latency_ms: f64, at: Instant) {
        self.frames += 1;
        self.sums.add(stages, 1.0);
        let bucket = ((latency_ms.max(0.0) / BUCKET_MS) as usize).min(BUCKETS - 1);
        self.histogram[bucket] = self.histogram[bucket].saturating_add(1);
        self.max_ms = self.max_ms.max(latency_ms);
        self.first.get_or_insert(at);
        self.last = Some(at);
    }

    /// Frames recorded so far.
    pub fn frames(&self) -> u64 {
        self.frames
    }

    /// The latency below which a fraction `q` of the frames fall (upper edge of its bucket).
    fn quantile(&self, q: f64) -> f64 {
        let total: u64 = self.histogram.iter().map(|&c| u64::from(c)).sum();
        if total == 0 {
            return 0.0;
        }
        let rank = ((total as f64 * q).ceil() as u64).max(1);
        let mut seen = 0u64;
        for (i, &c) in self.histogram.iter().enumerate() {
            seen += u64::from(c);
            if seen >= rank {
                if i == BUCKETS - 1 {
                    return self.max_ms;
                }
                return ((i + 1) as f64 * BUCKET_MS).min(self.max_ms);
            }
        }
        self.max_ms
    }

    /// The summary of what was recorded.
    pub fn report(&self) -> TimingReport {
        let mut mean = Stages::default();
        if self.frames > 0 {
            mean.add(&self.sums, 1.0 / self.frames as f64);
        }
        let span = match (self.first, self.last) {
            (Some(a), Some(b)) => (b - a).as_secs_f64(),
            _ => 0.0,
        };
        TimingReport {
            frames: self.frames,
            fps: if span > 0.0 {
                (self.frames - 1) as f64 / span
            } else {
                0.0
            },
            latency_p50_ms: self.quantile(0.5),
            latency_p95_ms: self.quantile(0.95),
            latency_max_ms: self.max_ms,
            mean,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn reports_rate_quantiles_and_means() {
        let mut t = Timing::default();
        let t0 = Instant::now();
        for i in 0..100u32 {
            let s = Stages {
                decode: 2.0,
                preprocess: 4.0,
                wait: f64::from(i % 2),
                inference: 20.0,
                postprocess: 1.0,
            };
            // Latencies 10.0, 10.5, ... 59.5 ms; one frame every 40 ms.
            t.record(
                &s,
                10.0 + f64::from(i) * 0.5,
                t0 + Duration::from_millis(40 * u64::from(i)),
            );
        }
        let r = t.report();
        assert_eq!(r.frames, 100);
        assert!((r.fps - 25.0).abs() < 1e-9, "{}", r.fps);
        assert!(
            (r.latency_p50_ms - 34.6).abs() < 0.11,
            "{}",
            r.latency_p50_ms
        );
        assert!(
            (r.latency_p95_ms - 57.1).abs() < 0.11,
            "{}",
            r.latency_p95_ms
        );
        assert_eq!(r.latency_max_ms, 59.5);
        assert_eq!(r.mean.inference, 20.0);
        assert_eq!(r.mean.wait, 0.5);
        assert!(
            r.to_string().starts_with("25.0 fps, capture to decision 3"),
            "{r}"
        );
    }

    #[test]
    fn empty_and_out_of_range() {
        assert_eq!(Timing::default().report(), TimingReport::default());
        let mut t = Timing::default();
        t.record(&Stages::default(), 5000.0, Instant::now());
        let r = t.report();
        assert_eq!(
            (r.fps, r.latency_p50_ms, r.latency_max_ms),
            (0.0, 5000.0, 5000.0)
        );
    }
}
