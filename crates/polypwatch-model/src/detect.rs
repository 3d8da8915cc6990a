//! From logits to a per-frame decision: probabilities, the thresholded mask, connected
//! components, and the frame's score.

use image::{GrayImage, Luma};
use imageproc::region_labelling::{Connectivity, connected_components};
use serde::{Deserialize, Serialize};

use crate::model::sigmoid;

/// Detection parameters in effect (see [`DetectOverrides::resolve`] for where they come from).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DetectConfig {
    /// Pixel probability threshold; `None` uses the model manifest's.
    #[serde(default)]
    pub pixel_threshold: Option<f32>,
    /// Smallest component, as a fraction of the frame, that can make a frame positive.
    #[serde(default = "default_min_area")]
    pub min_area: f32,
    /// Component score (mean probability inside it) at or above which a frame is positive.
    #[serde(default = "default_alert_score")]
    pub alert_score: f32,
    /// Lower score at or above which a frame is a candidate (logged at debug level only).
    #[serde(default = "default_candidate_score")]
    pub candidate_score: f32,
}

fn default_min_area() -> f32 {
    0.002
}
fn default_alert_score() -> f32 {
    0.7
}
fn default_candidate_score() -> f32 {
    0.55
}

impl Default for DetectConfig {
    fn default() -> Self {
        DetectConfig {
            pixel_threshold: None,
            min_area: default_min_area(),
            alert_score: default_alert_score(),
            candidate_score: default_candidate_score(),
        }
    }
}

impl DetectConfig {
    /// Checks ranges; the message names the key.
    pub fn validate(&self) -> Result<(), String> {
        if let Some(t) = self.pixel_threshold
            && !(t > 0.0 && t < 1.0)
        {
            return Err(format!("[detect] pixel_threshold = {t} must be in (0, 1)"));
        }
        if !(0.0..1.0).contains(&self.min_area) {
            return Err(format!(
                "[detect] min_area = {} must be in [0, 1)",
                self.min_area
            ));
        }
        for (k, v) in [
            ("alert_score", self.alert_score),
            ("candidate_score", self.candidate_score),
        ] {
            if !(v > 0.0 && v < 1.0) {
                return Err(format!("[detect] {k} = {v} must be in (0, 1)"));
            }
        }
        if self.candidate_score > self.alert_score {
            return Err(format!(
                "[detect] candidate_score = {} must not exceed alert_score = {}",
                self.candidate_score, self.alert_score
            ));
        }
        Ok(())
    }
}

/// The `[detect]` table of the daemon config: each key given overrides the model's operating
/// point (the manifest's `[detect]`), and a key given nowhere takes the built-in default.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DetectOverrides {
    /// Pixel probability threshold.
    #[serde(default)]
    pub pixel_threshold: Option<f32>,
    /// Smallest region, as a fraction of the frame, that can make a frame positive.
    #[serde(default)]
    pub min_area: Option<f32>,
    /// Frame score at or above which a frame is positive.
    #[serde(default)]
    pub alert_score: Option<f32>,
    /// Lower score at or above which a frame is a candidate (debug log only).
    #[serde(default)]
    pub candidate_score: Option<f32>,
}

/// Where an effective detect setting came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Origin {
    /// The daemon config's `[detect]`.
    Config,
    /// The model manifest's operating point (`[detect]`, or `[output] threshold` for pixels).
    Manifest,
    /// polypwatch's built-in default.
    Default,
}

impl std::fmt::Display for Origin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Origin::Config => "config [detect]",
            Origin::Manifest => "model manifest",
            Origin::Default => "built-in default",
        })
    }
}

/// Effective detect settings and where each came from.
#[derive(Debug, Clone, PartialEq)]
pub struct Resolved {
    /// The settings (pixel threshold always set).
    pub cfg: DetectConfig,
    /// `(key, value, origin)` for the four keys.
    pub origins: [(&'static str, f32, Origin); 4],
}

impl DetectOverrides {
    /// Checks the ranges of the keys given; the message names the key.
    pub fn validate(&self) -> Result<(), String> {
        let d = DetectConfig::default();
        DetectConfig {
            pixel_threshold: self.pixel_threshold,
            min_area: self.min_area.unwrap_or(d.min_area),
            alert_score: self.alert_score.unwrap_or(0.99),
            candidate_score: self.candidate_score.unwrap_or(0.01),
        }
        .validate()?;
        if let (Some(c), Some(a)) = (self.candidate_score, self.alert_score) {
            DetectConfig {
                candidate_score: c,
                alert_score: a,
                ..d
            }
            .validate()?;
        }
        Ok(())
    }

    /// The effective settings over a model's operating point (`point`, if its manifest has
    /// one) and its `[output] threshold`. A candidate score left to the default never exceeds
    /// the alert score; one set in the config that does is an error naming both origins.
    pub fn resolve(
        &self,
        point: Option<&crate::frames::OperatingPoint>,
        manifest_threshold: f32,
    ) -> Result<Resolved, String> {
        let d = DetectConfig::default();
        let pick = |given: Option<f32>, model: Option<f32>, default: f32| match (given, model) {
            (Some(v), _) => (v, Origin::Config),
            (None, Some(v)) => (v, Origin::Manifest),
            (None, None) => (default, Origin::Default),
        };
        let pt = pick(
            self.pixel_threshold,
            Some(point.map_or(manifest_threshold, |p| p.pixel_threshold)),
            manifest_threshold,
        );
        let area = pick(self.min_area, point.map(|p| p.min_area), d.min_area);
        let alert = pick(
            self.alert_score,
            point.map(|p| p.alert_score),
            d.alert_score,
        );
        let cand = match self.candidate_score {
            Some(v) => (v, Origin::Config),
            None => (d.candidate_score.min(alert.0), Origin::Default),
        };
        let cfg = DetectConfig {
            pixel_threshold: Some(pt.0),
            min_area: area.0,
            alert_score: alert.0,
            candidate_score: cand.0,
        };
        cfg.validate().map_err(|e| {
            format!(
                "{e} (alert_score from the {}, candidate_score from the {})",
                alert.1, cand.1
            )
        })?;
        Ok(Resolved {
            cfg,
            origins: [
                ("pixel_threshold", pt.0, pt.1),
                ("min_area", area.0, area.1),
                ("alert_score", alert.0, alert.1),
                ("candidate_score", cand.0, cand.1),
            ],
        })
    }
}

/// One connected region of polyp pixels.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Component {
    /// Pixels in the region.
    pub pixels: u32,
    /// Area as a fraction of the frame.
    pub area: f32,
    /// Mean polyp probability inside the region.
    pub score: f32,
    /// Bounding box `[x, y, width, height]` as fractions of the frame width/height.
    pub bbox: [f32; 4],
}

/// What one frame shows.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Detection {
    /// The best component (highest score among those of at least `min_area`), if any.
    pub best: Option<Component>,
    /// Number of components of at least `min_area`.
    pub components: usize,
    /// The frame's score: the best component's score, 0 without one.
    pub score: f32,
    /// Score >= alert_score: counts towards raising an alert.
    pub positive: bool,
    /// Score >= candidate_score.
    pub candidate: bool,
}

impl Detection {
    /// Nothing in view.
    pub fn none() -> Self {
        Detection {
            best: None,
            components: 0,
            score: 0.0,
            positive: false,
            candidate: false,
        }
    }
}

/// Turns logits into probabilities, a binary mask and a [`Detection`].
pub struct Detector {
    cfg: DetectConfig,
    pixel_threshold: f32,
}

impl Detector {
    /// A detector with `cfg`, falling back to `manifest_threshold` for pixels.
    pub fn new(cfg: DetectConfig, manifest_threshold: f32) -> Self {
        let pixel_threshold = cfg.pixel_threshold.unwrap_or(manifest_threshold);
        Detector {
            cfg,
            pixel_threshold,
        }
    }

    /// The pixel threshold in use.
    pub fn pixel_threshold(&self) -> f32 {
        self.pixel_threshold
    }

    /// Probabilities from logits (in place), and the binary mask (255 = polyp).
    pub fn mask(&self, logits: &mut [f32], width: u32, height: u32) -> GrayImage {
        let mut mask = GrayImage::new(width, height);
        for (p, px) in logits.iter_mut().zip(mask.pixels_mut()) {
            *p = sigmoid(*p);
            if *p >= self.pixel_threshold {
                *px = Luma([255]);
            }
        }
        mask
    }

    /// Scores a frame from its probabilities and mask (see [`Detector::mask`]).
    pub fn detect(&self, probs: &[f32], mask: &GrayImage) -> Detection {
        decide(&self.cfg, &regions_of_mask(probs, mask, None)).0
    }
}

/// A connected region of polyp pixels (before the `min_area` filter), and whether it touches
/// the true mask (when one was given).
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Region {
    /// The region.
    pub component: Component,
    /// At least one of its pixels is a polyp pixel of the true mask.
    pub overlaps_truth: bool,
}

/// Every 8-connected region of `probs` at or above `threshold` (`width` x `height`,
/// row-major), with its overlap with the binary `truth` (0/1).
pub fn regions(
    probs: &[f32],
    width: u32,
    height: u32,
    threshold: f32,
    truth: Option<&[u8]>,
) -> Vec<Region> {
    let mask = GrayImage::from_fn(width, height, |x, y| {
        Luma([if probs[(y * width + x) as usize] >= threshold {
            255
        } else {
            0
        }])
    });
    regions_of_mask(probs, &mask, truth)
}

/// Every 8-connected region of a binary mask (255 = polyp), scored with `probs`.
pub fn regions_of_mask(probs: &[f32], mask: &GrayImage, truth: Option<&[u8]>) -> Vec<Region> {
    let (w, h) = mask.dimensions();
    let labels = connected_components(mask, Connectivity::Eight, Luma([0u8]));
    // Per label: pixels, probability sum, bbox, overlap.
    let mut stats: Vec<(u32, f64, u32, u32, u32, u32, bool)> = Vec::new();
    for (i, l) in labels.as_raw().iter().enumerate() {
        if *l == 0 {
            continue;
        }
        let l = *l as usize;
        if stats.len() < l {
            stats.resize(l, (0, 0.0, u32::MAX, u32::MAX, 0, 0, false));
        }
        let (x, y) = (i as u32 % w, i as u32 / w);
        let s = &mut stats[l - 1];
        s.0 += 1;
        s.1 += probs[i] as f64;
        s.2 = s.2.min(x);
        s.3 = s.3.min(y);
        s.4 = s.4.max(x);
        s.5 = s.5.max(y);
        s.6 |= truth.is_some_and(|t| t[i] > 0);
    }
    let total = (w * h) as f32;
    stats
        .iter()
        .filter(|s| s.0 > 0)
        .map(|&(n, sum, x0, y0, x1, y1, overlaps_truth)| Region {
            component: Component {
                pixels: n,
                area: n as f32 / total,
                score: (sum / n as f64) as f32,
                bbox: [
                    x0 as f32 / w as f32,
                    y0 as f32 / h as f32,
                    (x1 - x0 + 1) as f32 / w as f32,
                    (y1 - y0 + 1) as f32 / h as f32,
                ],
            },
            overlaps_truth,
        })
        .collect()
}

/// The frame's decision under `cfg` from its regions, and the index of the best region: the
/// highest score (then the most pixels) among those of at least `min_area`.
pub fn decide(cfg: &DetectConfig, regions: &[Region]) -> (Detection, Option<usize>) {
    let kept = regions
        .iter()
        .enumerate()
        .filter(|(_, r)| r.component.area >= cfg.min_area);
    let components = kept.clone().count();
    let best = kept
        .max_by(|(_, a), (_, b)| {
            let (a, b) = (&a.component, &b.component);
            a.score.total_cmp(&b.score).then(a.pixels.cmp(&b.pixels))
        })
        .map(|(i, _)| i);
    let best_c = best.map(|i| regions[i].component);
    let score = best_c.map_or(0.0, |c| c.score);
    (
        Detection {
            best: best_c,
            components,
            score,
            positive: score >= cfg.alert_score,
            candidate: score >= cfg.candidate_score,
        },
        best,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn logit(p: f32) -> f32 {
        (p / (1.0 - p)).ln()
    }

    #[test]
    fn components_area_bbox_and_score() {
        let (w, h) = (10u32, 10u32);
        // A 3x2 blob of p = 0.9 at (2, 3), a single pixel of p = 0.6 at (8, 8), rest p = 0.1.
        let mut logits = vec![logit(0.1); 100];
        for y in 3..5 {
            for x in 2..5 {
                logits[y * 10 + x] = logit(0.9);
            }
        }
        logits[88] = logit(0.6);
        let d = Detector::new(
            DetectConfig {
                min_area: 0.0,
                ..Default::default()
            },
            0.5,
        );
        let mask = d.mask(&mut logits, w, h);
        let det = d.detect(&logits, &mask);
        assert_eq!(det.components, 2);
        let best = det.best.unwrap();
        assert_eq!(best.pixels, 6);
        assert!((best.score - 0.9).abs() < 1e-5);
        assert!((best.area - 0.06).abs() < 1e-6);
        assert_eq!(best.bbox, [0.2, 0.3, 0.3, 0.2]);
        assert!(det.positive && det.candidate);
    }

    #[test]
    fn small_components_are_ignored() {
        let mut logits = vec![logit(0.1); 100];
        logits[55] = logit(0.95);
        let d = Detector::new(
            DetectConfig {
                min_area: 0.02,
                ..Default::default()
            },
            0.5,
        );
        let mask = d.mask(&mut logits, 10, 10);
        let det = d.detect(&logits, &mask);
        assert_eq!(det.components, 0);
        assert!(!det.positive && det.score == 0.0);
    }

    #[test]
    fn candidate_between_the_two_levels() {
        let mut logits = vec![logit(0.6); 100];
        let d = Detector::new(DetectConfig::default(), 0.5);
        let mask = d.mask(&mut logits, 10, 10);
        let det = d.detect(&logits, &mask);
        assert!(det.candidate && !det.positive);
    }

    #[test]
    fn config_ranges() {
        assert!(DetectConfig::default().validate().is_ok());
        let bad = DetectConfig {
            candidate_score: 0.9,
            alert_score: 0.8,
            ..Default::default()
        };
        assert!(bad.validate().unwrap_err().contains("candidate_score"));
    }
}
