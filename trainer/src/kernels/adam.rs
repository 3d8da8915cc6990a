//! Adam in one parallel pass per parameter.
//!
//! Burn's `Adam` updates a parameter with about twelve element-wise tensor operations (weight
//! decay, both moments, the bias-corrected step, the subtraction), each a fresh allocation and a
//! pass over the parameter on the calling thread alone: on two threads the other core waits.
//! [`FusedAdam`] does the same operations, in the same order and in f32, element by element in
//! one pass shared between the rayon threads, writing the parameter and both moments in place.
//! Its state is Burn's [`AdamState`], so `optim.bpk` checkpoints stay interchangeable with
//! Burn's optimizer (a run resumes across the change either way).

use burn::backend::Dispatch;
use burn::backend::flex::FlexTensor;
use burn::optim::{
    Adam, AdamConfig, AdamState, AdaptiveMomentumState, LearningRate, ModuleOptimizer, Optimizer,
    decay::WeightDecayConfig,
};
use burn::tensor::{DType, Device, Tensor, TensorData};
use rayon::prelude::*;

use super::TrainOps;

/// Adam's hyper-parameters as Burn's `AdamConfig` defaults them (β1 0.9, β2 0.999, ε 1e-5).
const BETA_1: f32 = 0.9;
const BETA_2: f32 = 0.999;
const EPSILON: f32 = 1e-5;

/// The per-step scalars of one update, computed once as Burn's `AdaptiveMomentum` does.
#[derive(Clone, Copy, Debug)]
pub struct AdamScalars {
    /// L2 penalty added to the gradient, if any.
    pub weight_decay: Option<f32>,
    beta_1: f32,
    beta_2: f32,
    /// `sqrt(1 - β2^t) / (1 - β1^t)`.
    combined: f32,
    /// `ε sqrt(1 - β2^t)`.
    epsilon: f32,
    lr: f32,
}

impl AdamScalars {
    fn new(weight_decay: Option<f32>, time: usize, lr: LearningRate) -> Self {
        let time = time as i32;
        let bias_correction2_sqrt = (1.0 - BETA_2.powi(time)).sqrt();
        AdamScalars {
            weight_decay,
            beta_1: BETA_1,
            beta_2: BETA_2,
            combined: bias_correction2_sqrt / (1.0 - BETA_1.powi(time)),
            epsilon: EPSILON * bias_correction2_sqrt,
            lr: lr as f32,
        }
    }
}

/// Adam with Burn's defaults and an optional L2 weight decay, fused where the kernels are
/// [`enabled`](super::enabled) and Burn's own elsewhere (other backends, `--burn-kernels`).
#[derive(Clone)]
pub struct FusedAdam {
    burn: Adam,
    weight_decay: Option<f32>,
}

/// The optimizer the trainer and its bench use: Adam with `weight_decay` (0 for none).
pub fn adam(weight_decay: f64) -> ModuleOptimizer {
    let mut config = AdamConfig::new();
    let weight_decay = (weight_decay > 0.0).then_some(weight_decay as f32);
    if let Some(penalty) = weight_decay {
        config = config.with_weight_decay(Some(WeightDecayConfig::new(penalty)));
    }
    ModuleOptimizer::from(FusedAdam {
        burn: config.build(),
        weight_decay,
    })
}

impl Optimizer for FusedAdam {
    type State<const D: usize> = AdamState<D>;

    fn step<const D: usize>(
        &self,
        lr: LearningRate,
        tensor: Tensor<D>,
        grad: Tensor<D>,
        state: Option<Self::State<D>>,
    ) -> (Tensor<D>, Option<Self::State<D>>) {
        let amsgrad = state
            .as_ref()
            .is_some_and(|s| s.momentum.max_moment_2.is_some());
        if !super::enabled() || tensor.dtype() != DType::F32 || amsgrad {
            return self.burn.step(lr, tensor, grad, state);
        }
        // Zero moments make the first step's `m β1 + g (1 - β1)` Burn's `g (1 - β1)` exactly.
        let (time, m, v) = match state {
            Some(s) => (s.momentum.time, s.momentum.moment_1, s.momentum.moment_2),
            None => (0, tensor.zeros_like(), tensor.zeros_like()),
        };
        let time = time + 1;
        let (p, m, v) = <Dispatch as TrainOps>::adam_step(
            tensor.into_dispatch(),
            grad.into_dispatch(),
            m.into_dispatch(),
            v.into_dispatch(),
            AdamScalars::new(self.weight_decay, time, lr),
        );
        let momentum =
            AdaptiveMomentumState::new(time, Tensor::from_dispatch(m), Tensor::from_dispatch(v));
        (Tensor::from_dispatch(p), Some(AdamState::new(momentum)))
    }

    fn to_device<const D: usize>(state: Self::State<D>, device: &Device) -> Self::State<D> {
        Adam::to_device(state, device)
    }
}

/// `t` with its own contiguous f32 storage starting at its first value, copied only if shared
/// or a view.
fn owned(t: FlexTensor) -> FlexTensor {
    let n = t.layout().shape().num_elements();
    match t.layout().contiguous_offsets() {
        Some((0, end)) if end == n && t.bytes().len() == 4 * n => t,
        _ => {
            let shape = t.layout().shape().clone();
            let values = t.into_data().try_to_vec::<f32>().expect("an f32 tensor");
            FlexTensor::from_data(TensorData::new(values, shape))
        }
    }
}

/// Values per rayon task: large enough to amortise the task, small enough to share the
/// parameters of a few hundred thousand values.
const CHUNK: usize = 1 << 14;

/// One Adam update of `param` with `grad` on Flex: (parameter, first moment, second moment).
pub(super) fn step(
    param: FlexTensor,
    grad: FlexTensor,
    m: FlexTensor,
    v: FlexTensor,
    k: AdamScalars,
) -> (FlexTensor, FlexTensor, FlexTensor) {
    let grad = owned(grad);
    let (mut param, mut m, mut v) = (owned(param), owned(m), owned(v));
    {
        let g = grad.storage::<f32>();
        let (p, ms, vs) = (
            param.storage_mut::<f32>(),
            m.storage_mut::<f32>(),
            v.storage_mut::<f32>(),
        );
        if p.len() <= CHUNK {
            update(p, g, ms, vs, k);
        } else {
            p.par_chunks_mut(CHUNK)
                .zip(g.par_chunks(CHUNK))
                .zip(ms.par_chunks_mut(CHUNK))
                .zip(vs.par_chunks_mut(CHUNK))
                .for_each(|(((p, g), m), v)| update(p, g, m, v, k));
        }
    }
    (param, m, v)
}

/// Burn's operations in Burn's order: `g' = p wd + g`, `m = m β1 + g' (1 - β1)`,
/// `v = v β2 + g'² (1 - β2)`, `p = p - (m c) / (sqrt(v) + ε') lr`. No contraction into fused
/// multiply-adds (Rust does none unasked), so the results are Burn's to the bit.
#[multiversion::multiversion(targets("x86_64+avx512f+avx512vl", "x86_64+avx2"))]
fn update(p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32], k: AdamScalars) {
    let (f1, f2) = (1.0 - k.beta_1, 1.0 - k.beta_2);
    let wd = k.weight_decay.unwrap_or(0.0);
    let decay = k.weight_decay.is_some();
    for (((p, &g), m), v) in p.iter_mut().zip(g).zip(m.iter_mut()).zip(v.iter_mut()) {
        let g = if decay { *p * wd + g } else { g };
        *m = *m * k.beta_1 + g * f1;
        *v = *v * k.beta_2 + g * g * f2;
        let update = *m * k.combined / (v.sqrt() + k.epsilon);
        *p -= update * k.lr;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::nn::{Linear, LinearConfig};
    use burn::optim::GradientsParams;

    /// Parameters after `steps` Adam steps of a linear layer (weight over one rayon task)
    /// under a fixed loss, starting from `optim`; and the optimizer, for checkpointing.
    fn train(
        mut model: Linear,
        mut optim: ModuleOptimizer,
        steps: std::ops::Range<u64>,
        fused: bool,
    ) -> (Linear, ModuleOptimizer) {
        super::super::set_enabled(fused);
        let device = model.weight.val().device();
        for step in steps {
            // Not the global generator, which tests running beside this one draw from too.
            let x: Vec<f32> = (0..6 * 200u64)
                .map(|i| ((i * 7919 + step * 104_729) % 23) as f32 / 11.0 - 1.0)
                .collect();
            let x = Tensor::<2>::from_data(TensorData::new(x, [6, 200]), &device);
            let loss = model.forward(x).powf_scalar(2.0).mean();
            let grads = GradientsParams::from_grads(loss.backward(), &model);
            model = optim.step(1e-2, model, grads);
        }
        super::super::set_enabled(false);
        (model, optim)
    }

    fn values(model: &Linear) -> Vec<f32> {
        let mut v = model.weight.val().into_data().try_to_vec::<f32>().unwrap();
        v.extend(
            model
                .bias
                .as_ref()
                .unwrap()
                .val()
                .into_data()
                .try_to_vec::<f32>()
                .unwrap(),
        );
        v
    }

    /// Equal to the bit, or how many values differ and by how much at most.
    fn same(a: &Linear, b: &Linear, what: &str) {
        let (a, b) = (values(a), values(b));
        let differ: Vec<f32> = a
            .iter()
            .zip(&b)
            .filter(|(x, y)| x.to_bits() != y.to_bits())
            .map(|(x, y)| (x - y).abs())
            .collect();
        assert!(
            differ.is_empty(),
            "{what}: {} of {} values differ, by up to {:e}",
            differ.len(),
            a.len(),
            differ.iter().fold(0.0f32, |m, d| m.max(*d))
        );
    }

    fn burn_adam(weight_decay: f32) -> ModuleOptimizer {
        AdamConfig::new()
            .with_weight_decay(Some(WeightDecayConfig::new(weight_decay)))
            .init()
    }

    /// Three fused steps, a checkpoint, two steps of Burn's own Adam from it: to the bit the
    /// parameters of five steps of Burn's Adam. And the other way round.
    #[test]
    fn fused_adam_is_burns_adam_to_the_bit_and_shares_its_checkpoints() {
        let device = Device::flex().autodiff();
        device.seed(1);
        let start = LinearConfig::new(200, 100).init(&device);
        assert!(start.weight.val().shape().num_elements() > CHUNK);
        let (reference, _) = train(start.clone(), burn_adam(1e-2), 0..5, false);
        let (one_burn, _) = train(start.clone(), burn_adam(1e-2), 0..1, false);
        let (one_fused, _) = train(start.clone(), adam(1e-2), 0..1, true);
        same(&one_fused, &one_burn, "one step");

        let (model, optim) = train(start.clone(), adam(1e-2), 0..3, true);
        let bytes = optim.into_bytes().unwrap();
        let resumed = burn_adam(1e-2).from_bytes(bytes).unwrap();
        let (mixed, _) = train(model, resumed, 3..5, false);
        same(&mixed, &reference, "fused then Burn");

        let (model, optim) = train(start.clone(), burn_adam(1e-2), 0..3, false);
        let bytes = optim.into_bytes().unwrap();
        let resumed = adam(1e-2).from_bytes(bytes).unwrap();
        let (mixed, _) = train(model, resumed, 3..5, true);
        same(&mixed, &reference, "Burn then fused");

        // Without weight decay the update differs, and still matches.
        let (reference, _) = train(start.clone(), AdamConfig::new().init(), 0..4, false);
        let (fused, _) = train(start.clone(), adam(0.0), 0..4, true);
        same(&fused, &reference, "no weight decay");
        assert_ne!(values(&fused), values(&start));
    }
}
