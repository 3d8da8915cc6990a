//! ort-driver LIBONNXRUNTIME MODEL.onnx INPUT.f32 WARMUP RUNS THREADS
//!
//! Runs MODEL WARMUP + RUNS times on INPUT (raw little-endian f32, 1x3xHxW, written by
//! `examples/count_runs.rs`), as `bench/ort_bench.py` configures ONNX Runtime (all graph
//! optimisations, THREADS intra-op threads, 1 inter-op), intra-op spinning off so that idle
//! pool threads do not add instructions to a count.

use ort::session::Session;
use ort::session::builder::GraphOptimizationLevel;
use ort::value::TensorRef;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [lib, model, input, warmup, runs, threads] = &args[..] else {
        return Err(
            "usage: ort-driver LIBONNXRUNTIME MODEL.onnx INPUT.f32 WARMUP RUNS THREADS".into(),
        );
    };
    let (warmup, runs, threads): (usize, usize, usize) =
        (warmup.parse()?, runs.parse()?, threads.parse()?);
    let bytes = std::fs::read(input)?;
    let data: Vec<f32> = bytes
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    let side = ((data.len() / 3) as f64).sqrt() as usize;
    if 3 * side * side != data.len() {
        return Err(format!("{input}: {} floats is not 3 x H x H", data.len()).into());
    }
    let env = ort::init_from(lib)?.build()?;
    let mut session = Session::builder(&env)?
        .with_optimization_level(GraphOptimizationLevel::All)
        .map_err(|e| e.to_string())?
        .with_intra_threads(threads)
        .map_err(|e| e.to_string())?
        .with_inter_threads(1)
        .map_err(|e| e.to_string())?
        .with_intra_op_spinning(false)
        .map_err(|e| e.to_string())?
        .commit_from_file(model)?;
    let name = session.inputs()[0].name().to_string();
    let mut sum = 0.0f64;
    for _ in 0..warmup + runs {
        let x = TensorRef::from_array_view(([1usize, 3, side, side], &data[..]))?;
        let out = session.run(ort::inputs![name.as_str() => x])?;
        let (_, logits) = out[0].try_extract_tensor::<f32>()?;
        sum += logits.iter().map(|&v| f64::from(v)).sum::<f64>();
    }
    println!("{model}: {warmup} warm-up + {runs} runs, {threads} threads, logit sum {sum:.6e}");
    Ok(())
}
