//! Segmentation metrics for the polyp class, per image and averaged over a set.
//!
//! Every per-image ratio is computed from the confusion counts of one image. A ratio whose
//! denominator is zero scores 1.0 when the image is an exact empty-vs-empty match (no polyp in
//! the truth, none predicted) and 0.0 otherwise: predicting nothing on an image without polyp is
//! perfect, and that convention keeps the means comparable to the published tables.

use serde::{Deserialize, Serialize};

/// Pixel confusion counts of one image (positive = polyp).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Confusion {
    /// Polyp predicted, polyp in truth.
    pub tp: u64,
    /// Polyp predicted, background in truth.
    pub fp: u64,
    /// Background predicted, polyp in truth.
    pub fn_: u64,
    /// Background predicted, background in truth.
    pub tn: u64,
}

impl Confusion {
    /// Counts agreement between a binary prediction and a binary truth (0/1 or 0/non-zero).
    pub fn from_masks(pred: &[u8], truth: &[u8]) -> Self {
        assert_eq!(pred.len(), truth.len(), "prediction and truth sizes differ");
        let mut c = Confusion::default();
        for (&p, &t) in pred.iter().zip(truth) {
            match (p != 0, t != 0) {
                (true, true) => c.tp += 1,
                (true, false) => c.fp += 1,
                (false, true) => c.fn_ += 1,
                (false, false) => c.tn += 1,
            }
        }
        c
    }

    fn empty_match(&self) -> bool {
        self.tp == 0 && self.fp == 0 && self.fn_ == 0
    }

    fn ratio(&self, num: u64, den: u64) -> f64 {
        if den == 0 {
            if self.empty_match() { 1.0 } else { 0.0 }
        } else {
            num as f64 / den as f64
        }
    }

    /// Dice = 2TP / (2TP + FP + FN).
    pub fn dice(&self) -> f64 {
        self.ratio(2 * self.tp, 2 * self.tp + self.fp + self.fn_)
    }
    /// IoU (Jaccard) = TP / (TP + FP + FN).
    pub fn iou(&self) -> f64 {
        self.ratio(self.tp, self.tp + self.fp + self.fn_)
    }
    /// Precision = TP / (TP + FP).
    pub fn precision(&self) -> f64 {
        self.ratio(self.tp, self.tp + self.fp)
    }
    /// Recall (sensitivity) = TP / (TP + FN).
    pub fn recall(&self) -> f64 {
        self.ratio(self.tp, self.tp + self.fn_)
    }
    /// Pixel accuracy = (TP + TN) / all pixels.
    pub fn accuracy(&self) -> f64 {
        let n = self.tp + self.fp + self.fn_ + self.tn;
        if n == 0 {
            1.0
        } else {
            (self.tp + self.tn) as f64 / n as f64
        }
    }
    /// F2 = 5TP / (5TP + 4FN + FP): the F-beta score with recall weighted 4x (beta = 2).
    pub fn f2(&self) -> f64 {
        self.ratio(5 * self.tp, 5 * self.tp + 4 * self.fn_ + self.fp)
    }
}

/// Smoothing term of the soft Dice loss, as in the common Keras implementation the study used.
pub const SOFT_DICE_SMOOTH: f64 = 1.0;

/// The study's "Dice loss" of one image: 1 - (2 sum(p g) + 1) / (sum(p) + sum(g) + 1), with p
/// the predicted probabilities and g the binary truth.
pub fn soft_dice_loss(prob: &[f32], truth: &[u8]) -> f64 {
    assert_eq!(prob.len(), truth.len(), "prediction and truth sizes differ");
    let (mut inter, mut sp, mut sg) = (0.0f64, 0.0f64, 0.0f64);
    for (&p, &t) in prob.iter().zip(truth) {
        let g = f64::from(u8::from(t != 0));
        inter += p as f64 * g;
        sp += p as f64;
        sg += g;
    }
    1.0 - (2.0 * inter + SOFT_DICE_SMOOTH) / (sp + sg + SOFT_DICE_SMOOTH)
}

/// Metrics of one image.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct ImageScores {
    /// Dice coefficient of the thresholded mask.
    pub dice: f64,
    /// IoU (Jaccard) of the thresholded mask.
    pub iou: f64,
    /// Precision.
    pub precision: f64,
    /// Recall.
    pub recall: f64,
    /// Pixel accuracy.
    pub accuracy: f64,
    /// F2 score.
    pub f2: f64,
    /// Soft Dice loss of the probabilities.
    pub dice_loss: f64,
}

impl ImageScores {
    /// Scores one image from its probabilities, the decision threshold and the binary truth.
    pub fn compute(prob: &[f32], threshold: f32, truth: &[u8]) -> Self {
        let pred: Vec<u8> = prob.iter().map(|&p| u8::from(p >= threshold)).collect();
        let c = Confusion::from_masks(&pred, truth);
        ImageScores {
            dice: c.dice(),
            iou: c.iou(),
            precision: c.precision(),
            recall: c.recall(),
            accuracy: c.accuracy(),
            f2: c.f2(),
            dice_loss: soft_dice_loss(prob, truth),
        }
    }
}

/// Means over a set of images (each image weighs the same).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct SetScores {
    /// Number of images.
    pub images: usize,
    /// Mean per-image Dice.
    pub mean_dice: f64,
    /// Mean per-image IoU (the study's "mean IoU" / Jaccard).
    pub mean_iou: f64,
    /// Mean per-image precision.
    pub precision: f64,
    /// Mean per-image recall.
    pub recall: f64,
    /// Mean per-image pixel accuracy.
    pub accuracy: f64,
    /// Mean per-image F2.
    pub f2: f64,
    /// Mean per-image soft Dice loss (the study's "average Dice loss").
    pub dice_loss: f64,
}

/// Accumulates [`ImageScores`] into [`SetScores`].
#[derive(Debug, Clone, Default)]
pub struct Accumulator {
    sum: SetScores,
}

impl Accumulator {
    /// Adds one image.
    pub fn push(&mut self, s: &ImageScores) {
        let a = &mut self.sum;
        a.images += 1;
        a.mean_dice += s.dice;
        a.mean_iou += s.iou;
        a.precision += s.precision;
        a.recall += s.recall;
        a.accuracy += s.accuracy;
        a.f2 += s.f2;
        a.dice_loss += s.dice_loss;
    }

    /// The means so far (all zero for an empty set).
    pub fn finish(&self) -> SetScores {
        let n = self.sum.images.max(1) as f64;
        let a = &self.sum;
        SetScores {
            images: a.images,
            mean_dice: a.mean_dice / n,
            mean_iou: a.mean_iou / n,
            precision: a.precision / n,
            recall: a.recall / n,
            accuracy: a.accuracy / n,
            f2: a.f2 / n,
            dice_loss: a.dice_loss / n,
        }
    }
}

impl SetScores {
    /// Header of [`SetScores::table_row`].
    pub const TABLE_HEADER: &'static str = "set                     images  dice_loss  mean_iou  |  jaccard    dice  accuracy  |  precision  recall      f2";

    /// One row of the study's Table 2 (Dice loss, mean IoU) and Table 3 (Jaccard, Dice,
    /// accuracy) columns, followed by precision, recall and F2.
    pub fn table_row(&self, set: &str) -> String {
        format!(
            "{set:<23} {:>6}  {:>9.4}  {:>8.4}  |  {:>7.4}  {:>6.4}  {:>8.4}  |  {:>9.4}  {:>6.4}  {:>6.4}",
            self.images,
            self.dice_loss,
            self.mean_iou,
            self.mean_iou,
            self.mean_dice,
            self.accuracy,
            self.precision,
            self.recall,
            self.f2
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
    fn hand_computed_case() {
        // truth: 4 polyp pixels; prediction hits 3, adds 1 false positive, 2 background correct.
        let truth = [1, 1, 1, 1, 0, 0, 0];
        let pred = [1, 1, 1, 0, 1, 0, 0];
        let c = Confusion::from_masks(&pred, &truth);
        assert_eq!((c.tp, c.fp, c.fn_, c.tn), (3, 1, 1, 2));
        assert!(close(c.dice(), 6.0 / 8.0));
        assert!(close(c.iou(), 3.0 / 5.0));
        assert!(close(c.precision(), 3.0 / 4.0));
        assert!(close(c.recall(), 3.0 / 4.0));
        assert!(close(c.accuracy(), 5.0 / 7.0));
        assert!(close(c.f2(), 15.0 / 20.0));
    }

    #[test]
    fn empty_prediction_on_empty_truth_is_perfect() {
        let c = Confusion::from_masks(&[0, 0, 0], &[0, 0, 0]);
        for v in [
            c.dice(),
            c.iou(),
            c.precision(),
            c.recall(),
            c.accuracy(),
            c.f2(),
        ] {
            assert!(close(v, 1.0));
        }
    }

    #[test]
    fn empty_prediction_on_a_polyp_scores_zero() {
        let c = Confusion::from_masks(&[0, 0, 0], &[0, 1, 1]);
        assert!(close(c.dice(), 0.0));
        assert!(close(c.iou(), 0.0));
        assert!(close(c.precision(), 0.0));
        assert!(close(c.recall(), 0.0));
        assert!(close(c.accuracy(), 1.0 / 3.0));
    }

    #[test]
    fn false_alarm_on_empty_truth_scores_zero() {
        let c = Confusion::from_masks(&[1, 0], &[0, 0]);
        assert!(close(c.iou(), 0.0));
        assert!(close(c.recall(), 0.0));
        assert!(close(c.precision(), 0.0));
    }

    #[test]
    fn soft_dice_loss_by_hand() {
        // p = [1, 0.5, 0], g = [1, 1, 0]: inter 1.5, sum p 1.5, sum g 2
        let l = soft_dice_loss(&[1.0, 0.5, 0.0], &[1, 1, 0]);
        assert!(close(l, 1.0 - (3.0 + 1.0) / (3.5 + 1.0)));
        // perfect empty case: loss 0
        assert!(close(soft_dice_loss(&[0.0, 0.0], &[0, 0]), 0.0));
    }

    #[test]
    fn set_means_weigh_each_image_once() {
        let mut acc = Accumulator::default();
        acc.push(&ImageScores::compute(&[0.9, 0.1], 0.5, &[1, 0]));
        acc.push(&ImageScores::compute(&[0.1, 0.1], 0.5, &[1, 0]));
        let s = acc.finish();
        assert_eq!(s.images, 2);
        assert!(close(s.mean_iou, 0.5));
        assert!(close(s.mean_dice, 0.5));
        assert!(close(s.accuracy, 0.75));
        assert!(s.table_row("test").starts_with("test"));
    }
}
