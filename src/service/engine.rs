//! The parts of the pipeline a reload replaces (configuration, model, detector) and the
//! per-frame work done with them on the processing thread.

use std::time::Instant;

use super::ServiceError;
use super::handoff::Job;
use crate::capture::Frame;
use crate::config::Config;
use crate::detect::{Detection, Detector};
use crate::model::{ModelError, Segmenter};
use crate::store::Store;
use crate::timing::Stages;

/// The configuration and the model serving it.
pub(super) struct Engine {
    pub(super) cfg: Config,
    pub(super) seg: Segmenter,
    pub(super) detector: Detector,
}

/// The model to serve: the store's current model if one is installed and passes verification,
/// else the factory model of `[model] manifest`. `strict` (a reload): a current model that fails
/// is an error, so the running model keeps serving instead of falling back.
fn load_model(cfg: &Config, strict: bool) -> Result<Segmenter, ServiceError> {
    if let Some(u) = &cfg.update {
        let store = Store::open(u)?;
        if let Some(current) = store.current() {
            match crate::store::verify(&current, store.keys()) {
                Ok(v) => {
                    log::info!(
                        "installed model {} signed by {}, self-test IoU {:.4}",
                        current.display(),
                        v.key.id(),
                        v.selftest_iou
                    );
                    return Ok(v.segmenter);
                }
                Err(e) if strict => return Err(e.into()),
                Err(e) => log::error!(
                    "installed model {} fails verification ({e}); serving the factory model (`polypwatch model rollback` or install another)",
                    current.display()
                ),
            }
        }
    }
    Ok(Segmenter::load(&cfg.model.manifest)?)
}

impl Engine {
    /// Loads the model `cfg` asks for and fits `[detect]` to it.
    pub(super) fn new(cfg: Config, strict: bool) -> Result<Self, ServiceError> {
        let seg = load_model(&cfg, strict)?;
        let m = seg.manifest();
        let detect = cfg
            .detect
            .resolve(m.detect.as_ref(), m.output.threshold)
            .map_err(|message| ServiceError::Detect {
                model: format!("{} {}", m.model.name, m.model.version),
                message,
            })?;
        let detector = Detector::new(detect.cfg, m.output.threshold);
        Ok(Engine { cfg, seg, detector })
    }

    /// `name version (precision)`, for logs and events.
    pub(super) fn model_label(&self) -> String {
        let m = &self.seg.manifest().model;
        format!("{} {} ({})", m.name, m.version, m.precision)
    }
}

/// What processing one frame produced.
pub(super) struct Processed {
    pub(super) detection: Detection,
    pub(super) mask: image::GrayImage,
    /// Capture to decision (the alert machine's input is ready), in milliseconds.
    pub(super) latency_ms: f64,
    pub(super) stages: Stages,
    /// The frame had no detail and was not run through the model.
    pub(super) blank: bool,
}

/// Runs one frame through the model and the detector.
pub(super) fn process(engine: &Engine, job: Job) -> (Frame, Result<Processed, ModelError>) {
    let t0 = Instant::now();
    let r = &engine.seg.manifest().preprocess;
    let mut stages = Stages {
        decode: job.frame.decode_ms,
        preprocess: job.preprocess_ms,
        wait: (t0 - job.queued).as_secs_f64() * 1e3,
        ..Stages::default()
    };
    let input = if job.recipe == *r {
        job.input
    } else {
        // Prepared before a reload changed the recipe.
        let t = Instant::now();
        let input = r.tensor_from_rgb(&job.frame.image);
        stages.preprocess += t.elapsed().as_secs_f64() * 1e3;
        input
    };
    if crate::preprocess::is_blank(&job.frame.image) {
        // Not scored: a flat frame is no polyp (and must not hold an alert up).
        let p = Processed {
            detection: Detection::none(),
            mask: image::GrayImage::new(r.width, r.height),
            latency_ms: job.frame.captured.elapsed().as_secs_f64() * 1e3,
            stages,
            blank: true,
        };
        return (job.frame, Ok(p));
    }
    let t1 = Instant::now();
    let result = engine.seg.run(&input).map(|mut logits| {
        let t2 = Instant::now();
        let mask = engine.detector.mask(&mut logits, r.width, r.height);
        let detection = engine.detector.detect(&logits, &mask);
        stages.inference = (t2 - t1).as_secs_f64() * 1e3;
        stages.postprocess = t2.elapsed().as_secs_f64() * 1e3;
        Processed {
            detection,
            mask,
            latency_ms: job.frame.captured.elapsed().as_secs_f64() * 1e3,
            stages,
            blank: false,
        }
    });
    (job.frame, result)
}
