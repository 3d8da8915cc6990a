//! Where tract spends a frame: times every node of the optimised plan and prints the slowest
//! nodes and the total per operator kind.
//!
//! cargo run --release --example profile_nodes -- models/polypwatch-edge-f32.toml [RUNS] [THREADS]

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result};
use polypwatch::model::Segmenter;
use tract_onnx::prelude::*;

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let manifest = PathBuf::from(
        args.first()
            .context("usage: profile_nodes MANIFEST [RUNS] [THREADS]")?,
    );
    let runs: usize = args.get(1).map_or(Ok(20), |s| s.parse())?;
    let threads: usize = args.get(2).map_or(Ok(1), |s| s.parse())?;
    polypwatch::bench::set_threads(threads);
    // As `polypwatch` itself does.
    polypwatch::model::keep_frame_buffers();
    let seg = Segmenter::load(&manifest)?;
    let plan = seg.plan().clone();
    let (h, w) = (
        seg.manifest().preprocess.height as usize,
        seg.manifest().preprocess.width as usize,
    );
    let input: Tensor =
        tract_ndarray::Array4::<f32>::from_shape_fn((1, 3, h, w), |(_, c, y, x)| {
            ((c * 31 + y * 7 + x * 3) % 17) as f32 / 8.0 - 1.0
        })
        .into();
    let mut state = plan.spawn()?;
    let mut per_node: HashMap<usize, f64> = HashMap::new();
    let mut total = 0.0;
    let mut totals = vec![];
    for run in 0..runs + 2 {
        let t0 = Instant::now();
        let mut times: Vec<(usize, f64)> = vec![];
        polypwatch::accel::on_tract_threads(|| {
            state.run_plan_with_eval(tvec!(input.clone().into()), |ctx, st, node, inputs| {
                let t = Instant::now();
                let r = tract_onnx::tract_core::plan::eval(ctx, st, node, inputs);
                times.push((node.id, t.elapsed().as_secs_f64() * 1e3));
                r
            })
        })?;
        // The first two runs warm caches and lazily built kernels.
        if run >= 2 {
            let ms = t0.elapsed().as_secs_f64() * 1e3;
            total += ms;
            totals.push(ms);
            for (id, ms) in times {
                *per_node.entry(id).or_default() += ms;
            }
        }
    }
    let model = plan.model();
    let mut rows: Vec<(usize, f64)> = per_node
        .into_iter()
        .map(|(k, v)| (k, v / runs as f64))
        .collect();
    rows.sort_by(|a, b| b.1.total_cmp(&a.1));
    let mut by_op: HashMap<String, (f64, usize)> = HashMap::new();
    for (id, ms) in &rows {
        let e = by_op
            .entry(model.node(*id).op().name().to_string())
            .or_default();
        e.0 += ms;
        e.1 += 1;
    }
    // In order: slow runs that come in a burst are this VM's neighbours, not the model.
    let in_order: Vec<String> = totals.iter().map(|t| format!("{t:.1}")).collect();
    // The median and the minimum as well: this VM's neighbours move the mean by 10 %.
    totals.sort_by(f64::total_cmp);
    println!(
        "{} nodes, {:.2} ms per run, median {:.2}, min {:.2} ({} runs, {} threads)",
        model.nodes().len(),
        total / runs as f64,
        totals.get(runs / 2).copied().unwrap_or(f64::NAN),
        totals.first().copied().unwrap_or(f64::NAN),
        runs,
        threads
    );
    println!("runs (ms, in order): {}", in_order.join(" "));
    let mut ops: Vec<_> = by_op.into_iter().collect();
    ops.sort_by(|a, b| b.1.0.total_cmp(&a.1.0));
    for (op, (ms, n)) in ops {
        println!("{ms:8.2} ms {n:4} x {op}");
    }
    println!("--- slowest nodes");
    for (id, ms) in rows.iter().take(40) {
        let node = model.node(*id);
        let facts = model.node_input_facts(*id)?;
        let shapes: Vec<String> = facts.iter().map(|f| format!("{:?}", f.shape)).collect();
        println!(
            "{ms:8.2} ms #{id} {} [{}] {}",
            node.op().name(),
            node.name,
            shapes.join(" ")
        );
    }
    Ok(())
}
