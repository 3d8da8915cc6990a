//! Times one training step's convolutions of edge-multi's network (resnet18 w0.5, batch 8 of
//! 192x192) layer shape by layer shape on Flex: forward, input gradient, weight gradient
//! (polypwatch's and Burn's), with GFLOP/s. Where the step's time goes, without a profiler.
//!   RAYON_NUM_THREADS=1 cargo run --release --example conv_timing -p polypwatch-train

use std::time::Instant;

use burn::backend::Flex;
use burn::backend::flex::FlexTensor;
use burn::backend::ops::ModuleOps;
use burn::tensor::ops::ConvOptions;
use burn::tensor::{Shape, TensorData};

fn rand(shape: [usize; 4], seed: u32) -> FlexTensor {
    let n: usize = shape.iter().product();
    let mut s = seed.wrapping_mul(2654435761) | 1;
    let v: Vec<f32> = (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 17;
            s ^= s << 5;
            (s % 2001) as f32 / 1000.0 - 1.0
        })
        .collect();
    FlexTensor::from_data(TensorData::new(v, Shape::new(shape)))
}

fn time(reps: usize, mut f: impl FnMut()) -> f64 {
    f();
    let t = Instant::now();
    for _ in 0..reps {
        f();
    }
    t.elapsed().as_secs_f64() / reps as f64
}

/// The fastest of `reps` runs of `f` with the implicit-GEMM path on and off, interleaved so a
/// burst of load hits both: (on, off).
fn time_paths(reps: usize, mut f: impl FnMut()) -> (f64, f64) {
    let mut best = [f64::MAX; 2];
    for _ in 0..reps {
        for (i, on) in [true, false].into_iter().enumerate() {
            polypwatch_train::kernels::set_implicit_gemm(on);
            let t = Instant::now();
            f();
            best[i] = best[i].min(t.elapsed().as_secs_f64());
        }
    }
    polypwatch_train::kernels::set_implicit_gemm(true);
    (best[0], best[1])
}

/// (count, input, weight, stride, pad, dilation).
type Layer = (usize, [usize; 4], [usize; 4], usize, usize, usize);

fn main() {
    // The step's convolutions.
    let layers: &[Layer] = &[
        (1, [8, 3, 192, 192], [32, 3, 7, 7], 2, 3, 1),
        (4, [8, 32, 48, 48], [32, 32, 3, 3], 1, 1, 1),
        (1, [8, 32, 48, 48], [64, 32, 3, 3], 2, 1, 1),
        (1, [8, 32, 48, 48], [64, 32, 1, 1], 2, 0, 1),
        (1, [8, 32, 48, 48], [48, 32, 1, 1], 1, 0, 1),
        (3, [8, 64, 24, 24], [64, 64, 3, 3], 1, 1, 1),
        (1, [8, 64, 24, 24], [128, 64, 3, 3], 2, 1, 1),
        (1, [8, 64, 24, 24], [128, 64, 1, 1], 2, 0, 1),
        (3, [8, 128, 12, 12], [128, 128, 3, 3], 1, 1, 1),
        (1, [8, 128, 12, 12], [256, 128, 3, 3], 1, 2, 2),
        (1, [8, 128, 12, 12], [256, 128, 1, 1], 1, 0, 1),
        (3, [8, 256, 12, 12], [256, 256, 3, 3], 1, 2, 2),
        (1, [8, 256, 12, 12], [128, 256, 1, 1], 1, 0, 1),
        (1, [8, 256, 12, 12], [128, 256, 3, 3], 1, 6, 6),
        (1, [8, 256, 12, 12], [128, 256, 3, 3], 1, 12, 12),
        (1, [8, 256, 12, 12], [128, 256, 3, 3], 1, 18, 18),
        (1, [8, 640, 12, 12], [128, 640, 1, 1], 1, 0, 1),
        (1, [8, 176, 48, 48], [64, 176, 3, 3], 1, 1, 1),
        (1, [8, 64, 48, 48], [64, 64, 3, 3], 1, 1, 1),
    ];
    let mut totals = [0f64; 6];
    // Our three passes with the implicit-GEMM path and with the column layout throughout.
    let mut paths = [[0f64; 2]; 3];
    println!(
        "layer                                   fwd ms  xgrad ms  wgrad ms  burn-wgrad ms   fwd GFLOP/s"
    );
    for &(count, xs, ws, s, p, d) in layers {
        let x = rand(xs, 1);
        let w = rand(ws, 2);
        let opts = ConvOptions::new([s, s], [p, p], [d, d], 1);
        let y = Flex::conv2d(x.clone(), w.clone(), None, opts.clone());
        let ys: [usize; 4] = y.layout().shape().dims();
        let dy = rand(ys, 3);
        let flops = 2.0 * (ys.iter().product::<usize>() * ws[1] * ws[2] * ws[3]) as f64;
        let reps = 3;
        let f = time(reps, || {
            drop(Flex::conv2d(x.clone(), w.clone(), None, opts.clone()))
        });
        let xg = time(reps, || {
            drop(Flex::conv2d_x_backward(
                x.clone(),
                w.clone(),
                dy.clone(),
                opts.clone(),
            ))
        });
        let wg = time(reps, || {
            drop(polypwatch_train::kernels::conv_weight_grad(
                &x, &w, &dy, &opts,
            ))
        });
        let bw = time(reps, || {
            drop(Flex::conv2d_weight_backward(
                x.clone(),
                w.clone(),
                dy.clone(),
                opts.clone(),
            ))
        });
        let mine = time(reps, || {
            drop(polypwatch_train::kernels::conv_forward(
                x.clone(),
                w.clone(),
                &opts,
            ))
        });
        let ours = polypwatch_train::kernels::conv_forward(x.clone(), w.clone(), &opts);
        let (a, b) = (ours.storage::<f32>(), y.storage::<f32>());
        let err = a
            .iter()
            .zip(b)
            .map(|(p, q)| (p - q).abs())
            .fold(0f32, f32::max);
        let mine_x = time(reps, || {
            drop(polypwatch_train::kernels::conv_input_grad(
                x.clone(),
                w.clone(),
                dy.clone(),
                &opts,
            ))
        });
        let gx =
            polypwatch_train::kernels::conv_input_grad(x.clone(), w.clone(), dy.clone(), &opts);
        let rx = Flex::conv2d_x_backward(x.clone(), w.clone(), dy.clone(), opts.clone());
        let (a, b) = (gx.storage::<f32>(), rx.storage::<f32>());
        let errx = a
            .iter()
            .zip(b)
            .map(|(p, q)| (p - q).abs())
            .fold(0f32, f32::max);
        println!(
            "   our forward {:.1} ms (max diff {err:.2e}), input gradient {:.1} ms ({errx:.2e})",
            mine * 1e3,
            mine_x * 1e3
        );
        let passes = [
            time_paths(5, || {
                drop(polypwatch_train::kernels::conv_forward(
                    x.clone(),
                    w.clone(),
                    &opts,
                ))
            }),
            time_paths(5, || {
                drop(polypwatch_train::kernels::conv_input_grad(
                    x.clone(),
                    w.clone(),
                    dy.clone(),
                    &opts,
                ))
            }),
            time_paths(5, || {
                drop(polypwatch_train::kernels::conv_weight_grad(
                    &x, &w, &dy, &opts,
                ))
            }),
        ];
        println!(
            "   implicit GEMM / column layout, fastest of 5: forward {:.1} / {:.1} ms, input gradient {:.1} / {:.1} ms, weight gradient {:.1} / {:.1} ms",
            passes[0].0 * 1e3,
            passes[0].1 * 1e3,
            passes[1].0 * 1e3,
            passes[1].1 * 1e3,
            passes[2].0 * 1e3,
            passes[2].1 * 1e3
        );
        for (acc, p) in paths.iter_mut().zip(passes) {
            acc[0] += count as f64 * p.0;
            acc[1] += count as f64 * p.1;
        }
        let c = count as f64;
        for (t, v) in totals.iter_mut().zip([f, xg, bw, mine, mine_x, wg]) {
            *t += c * v;
        }
        println!(
            "{count} x {xs:?} {ws:?} s{s} d{d} {:>8.1} {:>9.1} {:>9.1} {:>14.1} {:>12.1}",
            f * 1e3,
            xg * 1e3,
            wg * 1e3,
            bw * 1e3,
            flops / f / 1e9
        );
    }
    println!(
        "step total, Flex/Burn: forward {:.0} ms, input gradient {:.0} ms, weight gradient {:.0} ms",
        totals[0] * 1e3,
        totals[1] * 1e3,
        totals[2] * 1e3
    );
    println!(
        "step total, polypwatch: forward {:.0} ms, input gradient {:.0} ms, weight gradient {:.0} ms",
        totals[3] * 1e3,
        totals[4] * 1e3,
        totals[5] * 1e3
    );
    println!(
        "step total, polypwatch, fastest runs, implicit GEMM / column layout: forward {:.0} / {:.0} ms, input gradient {:.0} / {:.0} ms, weight gradient {:.0} / {:.0} ms",
        paths[0][0] * 1e3,
        paths[0][1] * 1e3,
        paths[1][0] * 1e3,
        paths[1][1] * 1e3,
        paths[2][0] * 1e3,
        paths[2][1] * 1e3
    );
}
