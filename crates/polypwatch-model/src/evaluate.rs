//! Scoring a model on an image/mask set through the daemon's own inference path.

use crate::dataset::{DatasetError, Sample};
use crate::detect::DetectConfig;
use crate::frames::{Evaluation, FrameOutcome};
use crate::metrics::{Accumulator, ImageScores, SetScores};
use crate::model::{ModelError, Segmenter, sigmoid};

/// Errors raised while evaluating.
#[derive(Debug, thiserror::Error)]
pub enum EvalError {
    /// A sample could not be read.
    #[error(transparent)]
    Dataset(#[from] DatasetError),
    /// The model failed.
    #[error(transparent)]
    Model(#[from] ModelError),
}

/// The probabilities and scores of one image.
#[derive(Debug, Clone)]
pub struct Scored {
    /// Sample name.
    pub name: String,
    /// Polyp probability per pixel at the model's input size.
    pub probs: Vec<f32>,
    /// Scores against the resized truth mask.
    pub scores: ImageScores,
    /// The resized binary truth (0/1).
    pub truth: Vec<u8>,
}

/// Runs one sample: decode, preprocess with the manifest's recipe, infer, score against the
/// mask resized the same way.
pub fn score_sample(seg: &Segmenter, sample: &Sample, threshold: f32) -> Result<Scored, EvalError> {
    let (img, mask) = sample.load()?;
    let recipe = &seg.manifest().preprocess;
    let truth = recipe.resize_mask(&mask);
    let probs: Vec<f32> = seg.logits_for(&img)?.into_iter().map(sigmoid).collect();
    let scores = ImageScores::compute(&probs, threshold, &truth);
    Ok(Scored {
        name: sample.name.clone(),
        probs,
        scores,
        truth,
    })
}

/// Scores a set at the manifest's threshold; `progress` is called after each image.
pub fn evaluate(
    seg: &Segmenter,
    samples: &[Sample],
    mut progress: impl FnMut(&Scored),
) -> Result<SetScores, EvalError> {
    let threshold = seg.manifest().output.threshold;
    let mut acc = Accumulator::default();
    for s in samples {
        let scored = score_sample(seg, s, threshold)?;
        acc.push(&scored.scores);
        progress(&scored);
    }
    Ok(acc.finish())
}

/// Mask and frame metrics of a set through the daemon's path: mask metrics at the manifest's
/// threshold over the polyp images, frame metrics under `detect`. `progress` gets each image
/// and its outcome.
pub fn evaluate_frames(
    seg: &Segmenter,
    samples: &[Sample],
    detect: &DetectConfig,
    mut progress: impl FnMut(&Scored, &FrameOutcome),
) -> Result<Evaluation, EvalError> {
    let m = seg.manifest();
    let size = (m.preprocess.width, m.preprocess.height);
    let mut ev = Evaluation::default();
    for s in samples {
        let scored = score_sample(seg, s, m.output.threshold)?;
        let o = ev.push(
            &scored.probs,
            size,
            &scored.truth,
            m.output.threshold,
            detect,
        );
        progress(&scored, &o);
    }
    Ok(ev)
}
