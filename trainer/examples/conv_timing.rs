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

/// The fastest of `reps` runs of `f` on the three paths, interleaved so a burst of load hits
/// all: (direct kernel, implicit GEMM, column layout). The direct kernel takes the forward and
/// stride-1 input gradient only; the weight gradient's first two are the implicit GEMM.
fn time_paths(reps: usize, mut f: impl FnMut()) -> [f64; 3] {
    use polypwatch_train::kernels::{set_direct_conv, set_implicit_gemm};
    let mut best = [f64::MAX; 3];
    for _ in 0..reps {
        for (i, (direct, implicit)) in [(true, true), (false, true), (false, false)]
            .into_iter()
            .enumerate()
        {
            set_direct_conv(direct);
            set_implicit_gemm(implicit);
            let t = Instant::now();
            f();
            best[i] = best[i].min(t.elapsed().as_secs_f64());
        }
    }
    set_direct_conv(true);
    set_implicit_gemm(true);
    best
}

/// The fastest of `reps` runs of `f` with a switch on and off, interleaved: [on, off].
fn time_toggled(reps: usize, switch: fn(bool), mut f: impl FnMut()) -> [f64; 2] {
    let mut best = [f64::MAX; 2];
    for _ in 0..reps {
        for (i, on) in [true, false].into_iter().enumerate() {
            switch(on);
            let t = Instant::now();
            f();
            best[i] = best[i].min(t.elapsed().as_secs_f64());
        }
    }
    switch(true);
    best
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
    let mut pixel_major_totals = [0f64; 2];
    // Our three passes on each path: direct kernel, implicit GEMM, column layout throughout.
    let mut paths = [[0f64; 3]; 3];
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
            "   direct / implicit GEMM / column layout, fastest of 5: forward {}, input gradient {}, weight gradient {}",
            ms3(passes[0]),
            ms3(passes[1]),
            ms3(passes[2])
        );
        let pixel_major = time_toggled(5, polypwatch_train::kernels::set_pixel_major_wgrad, || {
            drop(polypwatch_train::kernels::conv_weight_grad(
                &x, &w, &dy, &opts,
            ))
        });
        println!(
            "   weight gradient, 3x3 pixel-major kernel on / off, fastest of 5: {:.1} / {:.1} ms",
            pixel_major[0] * 1e3,
            pixel_major[1] * 1e3
        );
        for (t, v) in pixel_major_totals.iter_mut().zip(pixel_major) {
            *t += count as f64 * v;
        }
        for (acc, p) in paths.iter_mut().zip(passes) {
            for (a, v) in acc.iter_mut().zip(p) {
                *a += count as f64 * v;
            }
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
        "step total, polypwatch, fastest runs, direct / implicit GEMM / column layout: forward {}, input gradient {}, weight gradient {}",
        ms3(paths[0]),
        ms3(paths[1]),
        ms3(paths[2])
    );
    println!(
        "step total, weight gradient, 3x3 pixel-major kernel on / off, fastest runs: {:.1} / {:.1} ms",
        pixel_major_totals[0] * 1e3,
        pixel_major_totals[1] * 1e3
    );
}

fn ms3(t: [f64; 3]) -> String {
    format!(
        "{:.1} / {:.1} / {:.1} ms",
        t[0] * 1e3,
        t[1] * 1e3,
        t[2] * 1e3
    )
}
