//! The rewrites as an explicit list of named passes, run in order, each of which can be switched
//! off by name (for profiling: what does one operator buy?) with [`OFF_VAR`] or
//! [`optimize_with`].
//!
//! Order matters where a rule matches what an earlier one made; the list says where. A pass
//! switched off only leaves its nodes to tract: the rules after it match nothing of its making
//! and replace fewer nodes, never different ones.

use tract_onnx::prelude::*;
use tract_onnx::tract_core::internal::bail;

use crate::patch::{replace_each, replace_each_wired, swap_each};
use crate::{fconv, im2col, pad, pool, qconv, quantize, resize};

/// The environment variable that switches passes off: pass names separated by commas (e.g.
/// `POLYPWATCH_ACCEL_OFF=qconv,fconv`), read by [`optimize`].
pub const OFF_VAR: &str = "POLYPWATCH_ACCEL_OFF";

/// Which model a pass rewrites.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// The decluttered model, before tract lowers convolutions to matrix products.
    Decluttered,
    /// tract's optimised plan.
    Optimized,
}

/// One rewrite of the plan.
pub struct Pass {
    /// Its name: the key of its count in [`Rewrites`], and what [`OFF_VAR`] names.
    pub name: &'static str,
    /// Which model it rewrites.
    pub phase: Phase,
    /// Applies it to every node it matches; returns how many it replaced.
    run: fn(&mut TypedModel) -> TractResult<usize>,
}

/// Every pass, in the order they run.
pub const PASSES: &[Pass] = &[
    // Float convolutions (with their residual additions and ReLUs) become `fconv::FConv` (CPUs
    // with a kernel for it), before tract lowers them.
    Pass {
        name: "fconv",
        phase: Phase::Decluttered,
        run: |model| match fconv::Kernel::fast() {
            Some(kernel) => fconv::fuse(model, kernel),
            None => Ok(0),
        },
    },
    // `Im2col` nodes become `im2col::PackedIm2Col`.
    Pass {
        name: "im2col",
        phase: Phase::Optimized,
        run: |model| replace_each(model, im2col::replacement),
    },
    // Bilinear `Resize` nodes become `resize::Bilinear`.
    Pass {
        name: "resize",
        phase: Phase::Optimized,
        run: |model| replace_each(model, resize::replacement),
    },
    // `QuantizeLinearU8` nodes become `quantize::Quantize`.
    Pass {
        name: "quantize",
        phase: Phase::Optimized,
        run: |model| replace_each(model, quantize::replacement),
    },
    // Quantized concatenations become `quantize::QuantizeConcat`.
    Pass {
        name: "quantize_concat",
        phase: Phase::Optimized,
        run: |model| replace_each_wired(model, quantize::fuse_concat),
    },
    // Constant `Pad` nodes (float convolutions) become `pad::Pad`.
    Pass {
        name: "pad",
        phase: Phase::Optimized,
        run: |model| replace_each(model, pad::replacement),
    },
    // int8 `PackedIm2col -> OptMatMul` pairs become `qconv::QConv` (CPUs with a kernel for
    // it). After `im2col`: it fuses our im2col with the product that reads it.
    Pass {
        name: "qconv",
        phase: Phase::Optimized,
        run: |model| replace_each_wired(model, qconv::replacement),
    },
    // Float max pools of dequantized bytes become `pool::MaxPoolU8` before the dequantization.
    Pass {
        name: "max_pool",
        phase: Phase::Optimized,
        run: |model| swap_each(model, pool::swap_max_pool),
    },
    // Other float max pools become `pool::MaxPoolF32`. After `max_pool`, which takes the int8
    // model's float pooling of bytes.
    Pass {
        name: "max_pool_f32",
        phase: Phase::Optimized,
        run: |model| replace_each(model, pool::max_pool_f32),
    },
    // u8 `DequantizeLinearF32` nodes become `pool::Dequantize`.
    Pass {
        name: "dequantize",
        phase: Phase::Optimized,
        run: |model| replace_each(model, pool::dequantize),
    },
    // `QConv -> Dequantize` pairs become one `qconv::QConv` storing floats. After
    // `dequantize` and `qconv`.
    Pass {
        name: "qconv_dequantize",
        phase: Phase::Optimized,
        run: |model| replace_each_wired(model, qconv::fuse_dequantize),
    },
    // Residual additions and the ReLUs after them folded into the dequantizing `QConv` that
    // feeds them. After `qconv_dequantize`.
    Pass {
        name: "qconv_residual",
        phase: Phase::Optimized,
        run: |model| replace_each_wired(model, qconv::fuse_residual),
    },
];

/// How many nodes each pass replaced, keyed by the pass's name.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Rewrites {
    /// Each pass that ran, in order, and its count.
    counts: Vec<(&'static str, usize)>,
    /// The passes switched off.
    off: Vec<&'static str>,
}

impl Rewrites {
    /// How many nodes the pass `name` replaced (0 if it did not run).
    pub fn get(&self, name: &str) -> usize {
        self.counts
            .iter()
            .find(|(n, _)| *n == name)
            .map_or(0, |&(_, c)| c)
    }

    /// Each pass that ran and its count, in the order they ran.
    pub fn iter(&self) -> impl Iterator<Item = (&'static str, usize)> + '_ {
        self.counts.iter().copied()
    }

    /// The passes that were switched off.
    pub fn off(&self) -> &[&'static str] {
        &self.off
    }
}

/// The count of a pass by name; panics on a name no pass has, so a typo fails loudly.
impl std::ops::Index<&str> for Rewrites {
    type Output = usize;

    fn index(&self, name: &str) -> &usize {
        static ZERO: usize = 0;
        match self.counts.iter().find(|(n, _)| *n == name) {
            Some((_, c)) => c,
            None if PASSES.iter().any(|p| p.name == name) => &ZERO,
            None => panic!("no pass is named {name:?}"),
        }
    }
}

/// The passes an [`OFF_VAR`]-style list names (comma-separated, blanks ignored); an unknown
/// name is an error that lists the passes.
pub fn parse_off(list: &str) -> TractResult<Vec<&'static str>> {
    list.split(',')
        .map(str::trim)
        .filter(|n| !n.is_empty())
        .map(|n| match PASSES.iter().find(|p| p.name == n) {
            Some(p) => Ok(p.name),
            None => bail!(
                "{OFF_VAR} names {n:?}, which is not a pass; the passes: {}",
                PASSES.iter().map(|p| p.name).collect::<Vec<_>>().join(", ")
            ),
        })
        .collect()
}

/// Runs the passes of `phase` but those in `off`, adding their counts to `done`.
fn run_phase(
    model: &mut TypedModel,
    phase: Phase,
    off: &[&str],
    done: &mut Rewrites,
) -> TractResult<()> {
    for pass in PASSES.iter().filter(|p| p.phase == phase) {
        if off.contains(&pass.name) {
            done.off.push(pass.name);
        } else {
            done.counts.push((pass.name, (pass.run)(model)?));
        }
    }
    Ok(())
}

/// tract's optimisation with every pass but those [`OFF_VAR`] names: float convolutions
/// become [`fconv::FConv`] before tract lowers them to matrix products, the other passes apply
/// to tract's optimised plan.
pub fn optimize(model: TypedModel) -> TractResult<(TypedModel, Rewrites)> {
    let off = match std::env::var(OFF_VAR) {
        Ok(list) => parse_off(&list)?,
        Err(_) => vec![],
    };
    optimize_with(model, &off)
}

/// [`optimize`] with the passes named in `off` switched off (whatever [`OFF_VAR`] says).
pub fn optimize_with(model: TypedModel, off: &[&str]) -> TractResult<(TypedModel, Rewrites)> {
    let mut done = Rewrites::default();
    let mut model = model.into_decluttered()?;
    run_phase(&mut model, Phase::Decluttered, off, &mut done)?;
    let mut model = model.into_optimized()?;
    run_phase(&mut model, Phase::Optimized, off, &mut done)?;
    Ok((model, done))
}

/// Applies every pass of the optimised phase to a model tract has optimised.
pub fn rewrite(model: &mut TypedModel) -> TractResult<Rewrites> {
    let mut done = Rewrites::default();
    run_phase(model, Phase::Optimized, &[], &mut done)?;
    Ok(done)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::shipped_model;

    #[test]
    fn an_off_list_names_passes_and_a_typo_lists_them() {
        assert_eq!(parse_off(" qconv, ,fconv ").unwrap(), ["qconv", "fconv"]);
        assert!(parse_off("").unwrap().is_empty());
        let e = parse_off("qconv,qconf").unwrap_err().to_string();
        assert!(
            e.contains("\"qconf\"") && e.contains("im2col, resize"),
            "{e}"
        );
        let names: Vec<_> = PASSES.iter().map(|p| p.name).collect();
        let mut unique = names.clone();
        unique.sort();
        unique.dedup();
        assert_eq!(unique.len(), names.len(), "{names:?}");
    }

    /// A pass switched off replaces nothing and the others still run, keyed by name.
    #[test]
    fn a_pass_switched_off_leaves_its_nodes_to_tract() {
        let mut all = shipped_model("polypwatch-edge-int8.onnx");
        let mut some = all.clone();
        let full = rewrite(&mut all).unwrap();
        let mut done = Rewrites::default();
        run_phase(&mut some, Phase::Optimized, &["quantize"], &mut done).unwrap();
        assert_eq!(done.off(), ["quantize"]);
        assert_eq!(done["quantize"], 0);
        assert!(full["quantize"] > 5, "{full:?}");
        assert_eq!(done["im2col"], full["im2col"]);
        assert_eq!(done.iter().count(), full.iter().count() - 1);
    }
}
