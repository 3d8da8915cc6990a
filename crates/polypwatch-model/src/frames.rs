//! Frame-level metrics: what the endoscopist sees is a warning per frame, not a mask.
//!
//! - **Sensitivity** on polyp frames: the frame is positive under the [`Detector`](crate::detect::Detector)
//!   and its best region overlaps the true mask. A positive frame whose best region misses the
//!   polyp is a miss *and* a false positive (the box points at the wrong place).
//! - **Specificity** on polyp-free frames: the frame is not positive.
//! - **AUROC** of the frame score (the best region's mean probability, 0 without a region) over
//!   polyp and polyp-free frames, and the ROC curve behind it.
//!
//! The operating point ([`choose_operating_point`]) is searched over the same region lists, so
//! the figures it reports are exactly the ones `eval` measures at that point.

use serde::{Deserialize, Serialize};

use crate::detect::{DetectConfig, Region, decide, regions};
use crate::metrics::{Accumulator, ImageScores, SetScores};

/// One frame's regions at one pixel threshold, with whether the frame shows a polyp.
#[derive(Debug, Clone)]
pub struct FrameRegions {
    /// The true mask has at least one polyp pixel.
    pub polyp: bool,
    /// Every connected region of the thresholded mask (unfiltered), with its overlap flag.
    pub regions: Vec<Region>,
}

impl FrameRegions {
    /// Regions of `probs` thresholded at `pixel_threshold`, against the binary `truth` (0/1).
    pub fn compute(
        probs: &[f32],
        width: u32,
        height: u32,
        pixel_threshold: f32,
        truth: &[u8],
    ) -> Self {
        FrameRegions {
            polyp: truth.iter().any(|&t| t > 0),
            regions: regions(probs, width, height, pixel_threshold, Some(truth)),
        }
    }
}

/// What one frame comes to under detect settings.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct FrameOutcome {
    /// The frame shows a polyp.
    pub polyp: bool,
    /// Its score (the best region's mean probability, 0 without one).
    pub score: f32,
    /// Positive under the settings.
    pub positive: bool,
    /// The best region overlaps the true mask.
    pub on_target: bool,
}

impl FrameOutcome {
    /// The outcome of `frame` under `cfg`.
    pub fn of(frame: &FrameRegions, cfg: &DetectConfig) -> Self {
        let (det, best) = decide(cfg, &frame.regions);
        FrameOutcome {
            polyp: frame.polyp,
            score: det.score,
            positive: det.positive,
            on_target: best.is_some_and(|i| frame.regions[i].overlaps_truth),
        }
    }
}

/// Frame counts at one operating point.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct FrameCounts {
    /// Frames with a polyp.
    pub polyp_frames: usize,
    /// Polyp frames that are positive with the best region on the polyp.
    pub hits: usize,
    /// Polyp frames that are positive with the best region elsewhere (a miss and a false
    /// positive).
    pub misplaced: usize,
    /// Polyp-free frames.
    pub free_frames: usize,
    /// Polyp-free frames that are positive.
    pub false_positives: usize,
}

impl FrameCounts {
    /// Adds one frame.
    pub fn push(&mut self, o: &FrameOutcome) {
        if o.polyp {
            self.polyp_frames += 1;
            if o.positive && o.on_target {
                self.hits += 1;
            } else if o.positive {
                self.misplaced += 1;
            }
        } else {
            self.free_frames += 1;
            self.false_positives += usize::from(o.positive);
        }
    }

    /// Hits over polyp frames (`None` without polyp frames).
    pub fn sensitivity(&self) -> Option<f64> {
        (self.polyp_frames > 0).then(|| self.hits as f64 / self.polyp_frames as f64)
    }

    /// Quiet polyp-free frames over polyp-free frames (`None` without any).
    pub fn specificity(&self) -> Option<f64> {
        (self.free_frames > 0).then(|| 1.0 - self.false_positives as f64 / self.free_frames as f64)
    }

    /// False-positive polyp-free frames per 1000 polyp-free frames.
    pub fn false_positives_per_1000(&self) -> Option<f64> {
        self.specificity().map(|s| (1.0 - s) * 1000.0)
    }
}

/// Area under the ROC curve of scores: the probability that a random polyp frame scores
/// above a random polyp-free one (ties count half). `None` unless both kinds are present.
pub fn auroc(polyp: &[f32], free: &[f32]) -> Option<f64> {
    if polyp.is_empty() || free.is_empty() {
        return None;
    }
    let mut all: Vec<(f32, bool)> = polyp
        .iter()
        .map(|&s| (s, true))
        .chain(free.iter().map(|&s| (s, false)))
        .collect();
    all.sort_by(|a, b| a.0.total_cmp(&b.0));
    // Mann-Whitney U with mid-ranks for ties.
    let mut rank_sum = 0.0;
    let mut i = 0;
    while i < all.len() {
        let mut j = i;
        while j < all.len() && all[j].0 == all[i].0 {
            j += 1;
        }
        let mid = (i + j + 1) as f64 / 2.0;
        rank_sum += mid * all[i..j].iter().filter(|x| x.1).count() as f64;
        i = j;
    }
    let (np, nf) = (polyp.len() as f64, free.len() as f64);
    Some((rank_sum - np * (np + 1.0) / 2.0) / (np * nf))
}

/// The ROC curve: (false-positive rate, true-positive rate) for every distinct score taken as
/// the threshold, from (0, 0) to (1, 1).
pub fn roc_curve(polyp: &[f32], free: &[f32]) -> Vec<(f64, f64)> {
    let mut th: Vec<f32> = polyp.iter().chain(free).copied().collect();
    th.sort_by(|a, b| b.total_cmp(a));
    th.dedup();
    let rate =
        |v: &[f32], t: f32| v.iter().filter(|&&s| s >= t).count() as f64 / v.len().max(1) as f64;
    let mut out = vec![(0.0, 0.0)];
    out.extend(th.iter().map(|&t| (rate(free, t), rate(polyp, t))));
    out.push((1.0, 1.0));
    out
}

/// The operating point chosen on validation data, with the figures it reaches there.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OperatingPoint {
    /// Pixel probability threshold.
    pub pixel_threshold: f32,
    /// Frame score at or above which a frame is positive.
    pub alert_score: f32,
    /// Smallest region, as a fraction of the frame.
    pub min_area: f32,
    /// The specificity the search had to reach.
    pub target_specificity: f64,
    /// Frame sensitivity on the validation polyp frames at this point.
    pub val_sensitivity: f64,
    /// Frame specificity on the validation polyp-free frames at this point.
    pub val_specificity: f64,
    /// Validation polyp frames.
    pub val_polyp_frames: usize,
    /// Validation polyp-free frames.
    pub val_free_frames: usize,
}

impl OperatingPoint {
    /// Detect settings at this point (candidate score just below the alert score, as the
    /// defaults keep them).
    pub fn detect_config(&self, base: &DetectConfig) -> DetectConfig {
        DetectConfig {
            pixel_threshold: Some(self.pixel_threshold),
            alert_score: self.alert_score,
            min_area: self.min_area,
            candidate_score: base.candidate_score.min(self.alert_score),
        }
    }
}

/// The grid searched by [`choose_operating_point`].
#[derive(Debug, Clone)]
pub struct Grid {
    /// Pixel thresholds (each needs its own region lists).
    pub pixel_thresholds: Vec<f32>,
    /// Alert scores.
    pub alert_scores: Vec<f32>,
    /// Minimum areas.
    pub min_areas: Vec<f32>,
}

impl Default for Grid {
    fn default() -> Self {
        Grid {
            pixel_thresholds: vec![0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9],
            alert_scores: (10..=19)
                // i / 20, not i * 0.05: 18 * 0.05 is 0.90000004 in f32, printed as such.
                .map(|i| i as f32 / 20.0)
                .chain([0.97, 0.99])
                .collect(),
            min_areas: vec![0.0, 0.001, 0.002, 0.005, 0.01, 0.02, 0.03, 0.05],
        }
    }
}

/// Searches `grid` for the highest frame sensitivity at frame specificity of at least
/// `target` on the validation frames. `frames[k]` are the frames' regions at
/// `grid.pixel_thresholds[k]`. Ties go to the higher specificity, then the higher pixel
/// threshold, alert score and area (the quieter point). `None` when no point reaches
/// `target`.
pub fn choose_operating_point(
    frames: &[Vec<FrameRegions>],
    grid: &Grid,
    target: f64,
) -> Option<OperatingPoint> {
    let mut best: Option<(OperatingPoint, (f64, f64))> = None;
    for (k, &pt) in grid.pixel_thresholds.iter().enumerate() {
        for &min_area in &grid.min_areas {
            for &alert_score in &grid.alert_scores {
                let cfg = DetectConfig {
                    pixel_threshold: Some(pt),
                    min_area,
                    alert_score,
                    candidate_score: alert_score,
                };
                let mut c = FrameCounts::default();
                for f in &frames[k] {
                    c.push(&FrameOutcome::of(f, &cfg));
                }
                let (Some(sens), Some(spec)) = (c.sensitivity(), c.specificity()) else {
                    continue;
                };
                if spec < target {
                    continue;
                }
                // Later grid points are quieter: `>=` lets them win ties.
                if best.as_ref().is_none_or(|(_, key)| (sens, spec) >= *key) {
                    best = Some((
                        OperatingPoint {
                            pixel_threshold: pt,
                            alert_score,
                            min_area,
                            target_specificity: target,
                            val_sensitivity: sens,
                            val_specificity: spec,
                            val_polyp_frames: c.polyp_frames,
                            val_free_frames: c.free_frames,
                        },
                        (sens, spec),
                    ));
                }
            }
        }
    }
    best.map(|(p, _)| p)
}

/// Mask and frame metrics of a set, pushed one frame at a time: the one evaluation behind the
/// trainer's `eval`, the daemon's `eval` and the operating-point report.
#[derive(Debug, Clone, Default)]
pub struct Evaluation {
    masks: Accumulator,
    counts: FrameCounts,
    polyp_scores: Vec<f32>,
    free_scores: Vec<f32>,
}

/// What an [`Evaluation`] comes to.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EvalReport {
    /// Mask metrics averaged over the polyp frames only (a polyp-free frame is scored by
    /// specificity, not by the empty-vs-empty convention).
    pub masks: SetScores,
    /// Frame counts at the detect settings.
    pub frames: FrameCounts,
    /// Frame sensitivity (hits over polyp frames).
    pub sensitivity: Option<f64>,
    /// Frame specificity (quiet over polyp-free frames).
    pub specificity: Option<f64>,
    /// False-positive frames per 1000 polyp-free frames.
    pub false_positives_per_1000: Option<f64>,
    /// AUROC of the frame score over polyp and polyp-free frames.
    pub auroc: Option<f64>,
}

impl Evaluation {
    /// Adds a frame: its probabilities (`width` x `height`), binary truth (0/1), the
    /// threshold of the mask metrics and the detect settings of the frame metrics.
    pub fn push(
        &mut self,
        probs: &[f32],
        (width, height): (u32, u32),
        truth: &[u8],
        mask_threshold: f32,
        detect: &DetectConfig,
    ) -> FrameOutcome {
        let pt = detect.pixel_threshold.unwrap_or(mask_threshold);
        let outcome = FrameOutcome::of(
            &FrameRegions::compute(probs, width, height, pt, truth),
            detect,
        );
        if outcome.polyp {
            self.masks
                .push(&ImageScores::compute(probs, mask_threshold, truth));
            self.polyp_scores.push(outcome.score);
        } else {
            self.free_scores.push(outcome.score);
        }
        self.counts.push(&outcome);
        outcome
    }

    /// Frame scores of the polyp frames and of the polyp-free frames (for a ROC curve).
    pub fn scores(&self) -> (&[f32], &[f32]) {
        (&self.polyp_scores, &self.free_scores)
    }

    /// The report so far.
    pub fn finish(&self) -> EvalReport {
        EvalReport {
            masks: self.masks.finish(),
            frames: self.counts,
            sensitivity: self.counts.sensitivity(),
            specificity: self.counts.specificity(),
            false_positives_per_1000: self.counts.false_positives_per_1000(),
            auroc: auroc(&self.polyp_scores, &self.free_scores),
        }
    }
}

impl EvalReport {
    /// Header of [`EvalReport::frame_row`].
    pub const FRAME_HEADER: &'static str = "set                     polyp  hits  misplaced  sensitivity  |   free    fp  specificity  fp/1000  |  auroc";

    /// One row of frame-level figures.
    pub fn frame_row(&self, set: &str) -> String {
        let f =
            |v: Option<f64>, w: usize| v.map_or(format!("{:>w$}", "-"), |v| format!("{v:>w$.4}"));
        let c = &self.frames;
        format!(
            "{set:<23} {:>5}  {:>4}  {:>9}  {}  |  {:>5}  {:>4}  {}  {}  |  {}",
            c.polyp_frames,
            c.hits,
            c.misplaced,
            f(self.sensitivity, 11),
            c.free_frames,
            c.false_positives,
            f(self.specificity, 11),
            self.false_positives_per_1000
                .map_or(format!("{:>7}", "-"), |v| format!("{v:>7.1}")),
            f(self.auroc, 5),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-12
    }

    #[test]
    fn auroc_by_hand() {
        assert!(close(auroc(&[0.9, 0.8], &[0.1, 0.2]).unwrap(), 1.0));
        assert!(close(auroc(&[0.1], &[0.9]).unwrap(), 0.0));
        // One tie between the two kinds counts half: pairs (0.5,0.5)=.5, (0.5,0.1)=1, (0.9,*)=2.
        assert!(close(auroc(&[0.5, 0.9], &[0.5, 0.1]).unwrap(), 3.5 / 4.0));
        assert!(auroc(&[0.5], &[]).is_none());
        let roc = roc_curve(&[0.5, 0.9], &[0.5, 0.1]);
        assert_eq!(roc.first(), Some(&(0.0, 0.0)));
        assert_eq!(roc.last(), Some(&(1.0, 1.0)));
        assert!(roc.contains(&(0.0, 0.5)));
    }

    /// A 10x10 frame with one square region of probability `p` at `(x, y)`, side `s`.
    fn frame(
        p: f32,
        x: usize,
        y: usize,
        s: usize,
        truth_at: Option<(usize, usize)>,
    ) -> FrameRegions {
        let mut probs = vec![0.05f32; 100];
        for yy in y..y + s {
            for xx in x..x + s {
                probs[yy * 10 + xx] = p;
            }
        }
        let mut truth = vec![0u8; 100];
        if let Some((tx, ty)) = truth_at {
            for yy in ty..ty + 3 {
                for xx in tx..tx + 3 {
                    truth[yy * 10 + xx] = 1;
                }
            }
        }
        FrameRegions::compute(&probs, 10, 10, 0.5, &truth)
    }

    #[test]
    fn a_hit_elsewhere_is_a_miss_and_a_false_positive() {
        let cfg = DetectConfig {
            min_area: 0.0,
            ..Default::default()
        };
        let mut c = FrameCounts::default();
        c.push(&FrameOutcome::of(&frame(0.9, 0, 0, 3, Some((0, 0))), &cfg)); // hit
        c.push(&FrameOutcome::of(&frame(0.9, 6, 6, 3, Some((0, 0))), &cfg)); // misplaced
        c.push(&FrameOutcome::of(&frame(0.6, 0, 0, 3, Some((0, 0))), &cfg)); // below alert_score
        c.push(&FrameOutcome::of(&frame(0.9, 2, 2, 2, None), &cfg)); // false positive
        c.push(&FrameOutcome::of(&frame(0.2, 2, 2, 2, None), &cfg)); // quiet
        assert_eq!(
            (
                c.polyp_frames,
                c.hits,
                c.misplaced,
                c.free_frames,
                c.false_positives
            ),
            (3, 1, 1, 2, 1)
        );
        assert!(close(c.sensitivity().unwrap(), 1.0 / 3.0));
        assert!(close(c.specificity().unwrap(), 0.5));
        assert!(close(c.false_positives_per_1000().unwrap(), 500.0));
    }

    #[test]
    fn operating_point_reaches_the_specificity_target() {
        // Polyp frames score 0.9 on 9-pixel regions; polyp-free ones have 4-pixel blobs of
        // 0.95 (one of them) and 0.8: only min_area above 4 % or alert_score above 0.95 is quiet.
        let grid = Grid {
            pixel_thresholds: vec![0.5],
            alert_scores: vec![0.7, 0.85, 0.96],
            min_areas: vec![0.0, 0.05],
        };
        let mut frames = vec![];
        for _ in 0..5 {
            frames.push(frame(0.9, 0, 0, 3, Some((0, 0))));
            frames.push(frame(0.8, 5, 5, 2, None));
        }
        frames.push(frame(0.95, 5, 5, 2, None));
        let p = choose_operating_point(&[frames.clone()], &grid, 0.99).unwrap();
        assert_eq!((p.min_area, p.alert_score), (0.05, 0.85));
        assert!(close(p.val_sensitivity, 1.0) && close(p.val_specificity, 1.0));
        // With only alert scores to choose, silence costs every hit.
        let grid = Grid {
            min_areas: vec![0.0],
            ..grid
        };
        let p = choose_operating_point(&[frames], &grid, 0.99).unwrap();
        assert_eq!(p.alert_score, 0.96);
        assert!(close(p.val_sensitivity, 0.0));
    }
}
