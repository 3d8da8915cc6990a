//! The operating point and frame-level figures of an exported model, measured the way the
//! daemon runs it (tract, the manifest's recipe, the library's `Detector` regions).
//!
//! Each source's validation (or test) names become a frame set; a polyp source with
//! `free_crops` adds a polyp-free set of the crops cut from those images (`<source>-free`).
//! The operating point is chosen on the validation sets only.

use std::path::Path;

use anyhow::Result;
use polypwatch_model::detect::DetectConfig;
use polypwatch_model::frames::{self, Evaluation, FrameRegions, Grid, OperatingPoint};
use polypwatch_model::model::{Segmenter, sigmoid};
use polypwatch_model::preprocess::Recipe;

use crate::config::TrainConfig;
use crate::data::{self, Item, Set};
use crate::train;

/// Specificity the operating point must reach on validation polyp-free frames.
pub const TARGET_SPECIFICITY: f64 = 0.99;

/// Frames of one source's set (or of its polyp-free crops).
pub struct FrameSet {
    /// `<source> <set>`, or `<source>-free <set>` for crops.
    pub name: String,
    /// The frames at the input size with their masks.
    pub items: Vec<Item>,
}

/// The `set` frames of every source of a run, with the crops of `free_crops` sources.
pub fn frame_sets(
    run: &Path,
    cfg: &TrainConfig,
    set: Set,
    recipe: &Recipe,
    quiet: bool,
) -> Result<Vec<FrameSet>> {
    let mut out = Vec::new();
    for source in cfg.data.sources() {
        let samples = data::open_run_split(run, cfg, &source, set)?;
        if samples.is_empty() {
            continue;
        }
        let label = format!("{} {}", source.name, set.as_str());
        let (items, crops) =
            train::load_with_bar_crops(&label, &samples, recipe, source.free_crops, quiet)?;
        out.push(FrameSet { name: label, items });
        if source.free_crops {
            out.push(FrameSet {
                name: format!("{}-free {}", source.name, set.as_str()),
                items: crops,
            });
        }
    }
    Ok(out)
}

/// The model's probabilities for every frame of the sets, through tract.
pub fn probabilities(seg: &Segmenter, sets: &[FrameSet]) -> Result<Vec<Vec<Vec<f32>>>> {
    sets.iter()
        .map(|s| {
            s.items
                .iter()
                .map(|i| Ok(seg.logits_for(&i.image)?.into_iter().map(sigmoid).collect()))
                .collect()
        })
        .collect()
}

/// Chooses the operating point on validation frames (`probs` of `sets`, as from
/// [`probabilities`]): the highest frame sensitivity at [`TARGET_SPECIFICITY`]. `None` when
/// the sets hold no polyp-free frame (a Kvasir-only run has nothing to measure it on); an
/// error when no setting reaches the target.
pub fn choose(
    sets: &[FrameSet],
    probs: &[Vec<Vec<f32>>],
    recipe: &Recipe,
) -> Result<Option<OperatingPoint>> {
    let free = sets
        .iter()
        .flat_map(|s| &s.items)
        .any(|i| i.mask.iter().all(|&m| m == 0));
    if !free {
        return Ok(None);
    }
    let grid = Grid::default();
    let frames: Vec<Vec<FrameRegions>> = grid
        .pixel_thresholds
        .iter()
        .map(|&pt| {
            sets.iter()
                .zip(probs)
                .flat_map(|(s, p)| s.items.iter().zip(p))
                .map(|(item, p)| {
                    FrameRegions::compute(p, recipe.width, recipe.height, pt, &item.mask)
                })
                .collect()
        })
        .collect();
    frames::choose_operating_point(&frames, &grid, TARGET_SPECIFICITY)
        .map(Some)
        .ok_or_else(|| {
            anyhow::anyhow!(
                "no detect setting of the grid reaches frame specificity {TARGET_SPECIFICITY} on the validation polyp-free frames: the model is not fit to ship"
            )
        })
}

/// Mask and frame metrics of each set at `detect` (masks at the manifest's `threshold`).
pub fn evaluate(
    sets: &[FrameSet],
    probs: &[Vec<Vec<f32>>],
    recipe: &Recipe,
    threshold: f32,
    detect: &DetectConfig,
) -> Vec<(String, Evaluation)> {
    sets.iter()
        .zip(probs)
        .map(|(s, p)| {
            let mut ev = Evaluation::default();
            for (item, p) in s.items.iter().zip(p) {
                ev.push(
                    p,
                    (recipe.width, recipe.height),
                    &item.mask,
                    threshold,
                    detect,
                );
            }
            (s.name.clone(), ev)
        })
        .collect()
}

/// All polyp frames' and all polyp-free frames' scores of several evaluations together.
pub fn pooled_scores(evals: &[(String, Evaluation)]) -> (Vec<f32>, Vec<f32>) {
    let (mut p, mut f) = (Vec::new(), Vec::new());
    for (_, e) in evals {
        let (a, b) = e.scores();
        p.extend_from_slice(a);
        f.extend_from_slice(b);
    }
    (p, f)
}
