//! Loading a verified model and running it with tract.

use std::path::{Path, PathBuf};

use image::RgbImage;
use tract_onnx::prelude::*;

use crate::manifest::{Manifest, ManifestError};

/// Errors raised while loading or running a model.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// The manifest is unreadable or does not match the model file.
    #[error(transparent)]
    Manifest(#[from] ManifestError),
    /// tract could not load or optimise the ONNX file.
    #[error("cannot load model {path} in tract: {message}")]
    Load {
        /// The ONNX file.
        path: PathBuf,
        /// tract's error chain.
        message: String,
    },
    /// The ONNX input or output shape differs from the manifest.
    #[error(
        "model {path}: {message}; the manifest does not describe this model file, re-export it"
    )]
    Shape {
        /// The ONNX file.
        path: PathBuf,
        /// Which shape differs.
        message: String,
    },
    /// Inference failed.
    #[error("inference failed: {0}")]
    Run(String),
    /// The input buffer has the wrong size.
    #[error("input holds {got} values, the model takes {expected} (3 x {height} x {width})")]
    InputSize {
        /// Values given.
        got: usize,
        /// Values expected.
        expected: usize,
        /// Model input height.
        height: u32,
        /// Model input width.
        width: u32,
    },
}

type Plan = Arc<TypedRunnableModel>;

/// A model checked against its manifest and optimised by tract, ready to run frames.
pub struct Segmenter {
    manifest: Manifest,
    onnx_path: PathBuf,
    plan: Plan,
}

impl std::fmt::Debug for Segmenter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Segmenter")
            .field("model", &self.manifest.model.name)
            .field("version", &self.manifest.model.version)
            .field("onnx", &self.onnx_path)
            .finish()
    }
}

fn tract_err(path: &Path) -> impl Fn(TractError) -> ModelError + '_ {
    move |e| ModelError::Load {
        path: path.to_path_buf(),
        message: format!("{e:#}"),
    }
}

/// Loads an ONNX file into tract and checks its input and output shapes against the manifest:
/// input `[1, 3, H, W]` and output `[1, 1, H, W]`.
pub fn load_checked(onnx: &Path, manifest: &Manifest) -> Result<TypedModel, ModelError> {
    let (h, w) = (
        manifest.preprocess.height as usize,
        manifest.preprocess.width as usize,
    );
    let bytes = crate::files::read_regular(onnx, crate::files::MODEL_CAP).map_err(|e| {
        ModelError::Load {
            path: onnx.to_path_buf(),
            message: e.to_string(),
        }
    })?;
    let model = tract_onnx::onnx()
        .model_for_read(&mut bytes.as_slice())
        .and_then(|m| m.into_typed())
        .map_err(tract_err(onnx))?;
    let shape_of = |fact: TractResult<&TypedFact>| -> Result<Vec<usize>, ModelError> {
        let fact = fact.map_err(tract_err(onnx))?;
        fact.shape
            .as_concrete()
            .map(|s| s.to_vec())
            .ok_or_else(|| ModelError::Shape {
                path: onnx.to_path_buf(),
                message: format!("shape {:?} is not static", fact.shape),
            })
    };
    let input = shape_of(model.input_fact(0))?;
    if input != [1, 3, h, w] {
        return Err(ModelError::Shape {
            path: onnx.to_path_buf(),
            message: format!("input shape is {input:?} but the manifest says [1, 3, {h}, {w}]"),
        });
    }
    let output = shape_of(model.output_fact(0))?;
    if output != [1, 1, h, w] {
        return Err(ModelError::Shape {
            path: onnx.to_path_buf(),
            message: format!("output shape is {output:?}, expected [1, 1, {h}, {w}]"),
        });
    }
    Ok(model)
}

/// tract's optimisation followed by our own rewrites (see [`polypwatch_accel`]), made runnable.
pub fn optimize(model: TypedModel) -> TractResult<Plan> {
    let (model, _) = polypwatch_accel::optimize(model)?;
    model.into_runnable()
}

impl Segmenter {
    /// Loads the manifest at `manifest_path`, checks the model file's sha256 and shapes, and
    /// optimises it for this CPU.
    pub fn load(manifest_path: &Path) -> Result<Self, ModelError> {
        let manifest = Manifest::load(manifest_path)?;
        let onnx_path = manifest.verify_sha256(manifest_path)?;
        let model = load_checked(&onnx_path, &manifest)?;
        let plan = optimize(model).map_err(tract_err(&onnx_path))?;
        Ok(Segmenter {
            manifest,
            onnx_path,
            plan,
        })
    }

    /// The manifest the model was loaded with.
    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// The optimised tract plan, for profiling.
    pub fn plan(&self) -> &Arc<TypedRunnableModel> {
        &self.plan
    }

    /// The ONNX file in use.
    pub fn onnx_path(&self) -> &Path {
        &self.onnx_path
    }

    /// Runs one normalised CHW input (see [`crate::preprocess::Recipe::tensor_from_rgb`]) and
    /// returns the polyp logits, H x W, row-major.
    pub fn run(&self, input: &[f32]) -> Result<Vec<f32>, ModelError> {
        let r = &self.manifest.preprocess;
        let (h, w) = (r.height as usize, r.width as usize);
        if input.len() != 3 * h * w {
            return Err(ModelError::InputSize {
                got: input.len(),
                expected: 3 * h * w,
                height: r.height,
                width: r.width,
            });
        }
        let tensor = Tensor::from_shape(&[1, 3, h, w], input)
            .map_err(|e| ModelError::Run(format!("{e:#}")))?;
        let out = polypwatch_accel::on_tract_threads(|| self.plan.run(tvec!(tensor.into())))
            .map_err(|e| ModelError::Run(format!("{e:#}")))?;
        let view = out[0]
            .to_plain_array_view::<f32>()
            .map_err(|e| ModelError::Run(format!("{e:#}")))?;
        Ok(view.iter().copied().collect())
    }

    /// Preprocesses a decoded frame with the manifest's recipe and returns its logits.
    pub fn logits_for(&self, img: &RgbImage) -> Result<Vec<f32>, ModelError> {
        self.run(&self.manifest.preprocess.tensor_from_rgb(img))
    }
}

/// Keeps the buffers a frame allocates and frees in the heap, for a process that runs a model
/// frame after frame.
///
/// glibc returns large freed blocks to the kernel (`mmap` / heap trim), so each frame's
/// interleaved inputs and outputs came back as fresh pages to fault in: 0.3 ms of a 10.8 ms
/// int8 frame here (`polypwatch bench`, 3 paired runs). Call it once at start-up; it changes the
/// whole process's allocator, so the library does not call it itself. Not glibc: no effect.
pub fn keep_frame_buffers() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets allocator parameters; 32 MiB is glibc's largest mmap threshold.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 256 << 20);
    }
}

/// The logistic function, mapping a logit to a probability.
pub fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}
