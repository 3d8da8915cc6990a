//! 3x3 stride-1 convolutions by Winograd's minimal filtering, F(2x2, 3x3) (Lavin and Gray,
//! "Fast Algorithms for Convolutional Neural Networks", 2016).
//!
//! Each 2x2 block of output pixels is `A^T [(G g G^T) . (B^T d B)] A` for its 4x4 input patch
//! `d`: 16 products per channel pair instead of 36, the products being 16 independent
//! matrix products (one per position `k` of the 4x4 transformed patch) that run on
//! [`FConv`]'s tile kernel as 1x1 convolutions over "pixels" that are tiles. 3x3 convolutions
//! at stride 1 are most of the model's arithmetic; the transforms are additions.
//!
//! The sums differ from a direct convolution's by float rounding (the tests bound it).

use super::{
    FConv, Floats, Geometry, Job, Kernel, LANES, MR, NV, Planes, Portable, SendPtr, Store,
    TileKernel,
};
use std::ops::Range;
use std::sync::Arc;

#[cfg(target_arch = "aarch64")]
mod aarch64;
#[cfg(target_arch = "x86_64")]
mod x86_64;

/// Positions of a transformed 4x4 patch.
const K: usize = 16;

/// What an [`FConv`] keeps to run by Winograd's algorithm.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Winograd {
    /// `G g G^T` per position `k`, as the tile kernel's panels: `[k][panel][c][MR]`.
    weights: Floats,
    /// Tiles (2x2 output blocks) down and across.
    th: usize,
    tw: usize,
    /// Vectors of `LANES` tiles (`th * tw / LANES`: rows are whole vectors).
    vectors: usize,
    /// Tile kernels' worth of vectors (`NV` each, the last maybe fewer).
    blocks: usize,
    /// The stride of an output channel in the product's output (`[k][m][tpad]`): the tiles,
    /// plus a line where that keeps the channels off the same L1 sets.
    tpad: usize,
    /// For a dilated convolution, or one whose tile rows are not whole vectors: where each
    /// lane reads and writes (`None`: rows of contiguous tiles, read as even/odd columns).
    gathered: Option<Gathered>,
}

/// Offsets in a channel's plane (`-1`: outside, padding) for every vector of `LANES` tiles.
///
/// A dilation-`d` convolution is `d x d` undilated ones, one per phase of the output
/// (`oy % d`, `ox % d`), each over the input pixels of that phase: each phase is tiled into
/// 2x2 blocks of its own pixels, and the tiles of all phases are numbered one after another.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Gathered {
    /// Patch element `k` of vector `v`'s tiles: `[v * 16 + k]`.
    input: Vec<[i32; LANES]>,
    /// Output `(a, b)` of vector `v`'s tiles: `[v * 4 + a * 2 + b]`.
    output: Vec<[i32; LANES]>,
}

impl Gathered {
    /// The tables for geometry `g` (3x3, stride 1, dilation `dy` = `dx`), and the number of
    /// tiles.
    fn new(g: &Geometry) -> Gathered {
        let d = g.dy;
        let mut tiles = vec![];
        for p in 0..d.min(g.oh) {
            for q in 0..d.min(g.ow) {
                let (rows, cols) = ((g.oh - p).div_ceil(d), (g.ow - q).div_ceil(d));
                for ta in 0..rows.div_ceil(2) {
                    for tb in 0..cols.div_ceil(2) {
                        tiles.push((p + 2 * d * ta, q + 2 * d * tb));
                    }
                }
            }
        }
        let vectors = tiles.len().div_ceil(LANES);
        let mut input = vec![[-1; LANES]; vectors * 16];
        let mut output = vec![[-1; LANES]; vectors * 4];
        for (t, &(oy, ox)) in tiles.iter().enumerate() {
            let (v, lane) = (t / LANES, t % LANES);
            for i in 0..4 {
                for j in 0..4 {
                    let y = (oy + d * i) as isize - g.pad_top;
                    let x = (ox + d * j) as isize - g.pad_left;
                    if (0..g.h as isize).contains(&y) && (0..g.w as isize).contains(&x) {
                        input[v * 16 + i * 4 + j][lane] = (y * g.w as isize + x) as i32;
                    }
                }
            }
            for a in 0..2 {
                for b in 0..2 {
                    let (y, x) = (oy + d * a, ox + d * b);
                    if y < g.oh && x < g.ow {
                        output[v * 4 + a * 2 + b][lane] = (y * g.ow + x) as i32;
                    }
                }
            }
        }
        Gathered { input, output }
    }

    fn vectors(&self) -> usize {
        self.output.len() / 4
    }
}

/// `WIDTH` floats, as the transforms use them: an AVX-512 register or an array of `LANES` for
/// the portable copy of the code, a NEON register of 4 that runs a vector of tiles a quarter at
/// a time (a 4x4 patch of four-register values is 64 registers, twice what NEON has, and
/// spilled). All do the same IEEE additions, so the results agree to the bit.
pub(super) trait Lanes: Copy {
    /// Floats in one value, dividing `LANES`.
    const WIDTH: usize;
    /// # Safety
    /// `n <= WIDTH` floats readable at `p`; the lanes past `n` are zero.
    unsafe fn load(p: *const f32, n: usize) -> Self;
    /// # Safety
    /// `n <= WIDTH` floats writable at `p`; the lanes past `n` are not written.
    unsafe fn store(self, p: *mut f32, n: usize);
    /// The 16 positions of a transformed patch, `step` floats apart from `p`: `WIDTH` floats
    /// each.
    ///
    /// # Safety
    /// As [`Lanes::load`] at every `p + k step`, with `n = WIDTH`.
    #[inline(always)]
    unsafe fn load16(p: *const f32, step: usize) -> [Self; K] {
        // SAFETY: the caller's. (A loop, not `array::from_fn`: see `transform_input_any`.)
        unsafe {
            let mut v = [Self::splat(0.0); K];
            for (k, v) in v.iter_mut().enumerate() {
                *v = Self::load(p.add(k * step), Self::WIDTH);
            }
            v
        }
    }
    /// The 16 positions of a transformed patch into `WIDTH` floats each, `step` floats apart
    /// from `p`.
    ///
    /// # Safety
    /// As [`Lanes::store`] at every `p + k step`, with `n = WIDTH`.
    #[inline(always)]
    unsafe fn store16(v: [Self; K], p: *mut f32, step: usize) {
        for (k, v) in v.into_iter().enumerate() {
            // SAFETY: the caller's.
            unsafe { v.store(p.add(k * step), Self::WIDTH) };
        }
    }
    fn add(self, o: Self) -> Self;
    fn sub(self, o: Self) -> Self;
    fn splat(v: f32) -> Self;
    /// `if x > 0 { x } else { 0 }` per lane.
    fn relu(self) -> Self;
    /// Lanes `a0 b0 a1 b1 ..`: the first `WIDTH` of them, then the rest.
    fn interleave(a: Self, b: Self) -> (Self, Self);
    /// `row[first + 2 l]` and `row[first + 2 l + 1]` for every lane `l`, zero outside `row`.
    fn even_odd(row: &[f32], first: isize) -> (Self, Self);
    /// `p[2 l]` and `p[2 l + 1]` for every lane `l`: [`Lanes::even_odd`] where all of them
    /// are inside the row, without its checks.
    ///
    /// # Safety
    /// `2 * WIDTH` floats readable at `p`.
    #[inline(always)]
    unsafe fn even_odd_inside(p: *const f32) -> (Self, Self) {
        // SAFETY: the caller's.
        Self::even_odd(unsafe { std::slice::from_raw_parts(p, 2 * Self::WIDTH) }, 0)
    }
    /// `x[at[l]]` for every lane, zero where `at[l] < 0`.
    ///
    /// # Safety
    /// `at` holds `WIDTH` offsets; every `at[l] >= 0` is inside `x`.
    unsafe fn gather(x: &[f32], at: &[i32]) -> Self;
    /// `x[at[l]] = self[l]` for every lane where `at[l] >= 0`.
    ///
    /// # Safety
    /// `at` holds `WIDTH` offsets; every `at[l] >= 0` is inside `x`, and they differ.
    unsafe fn scatter(self, x: &mut [f32], at: &[i32]);
}

/// The offsets of part `part` (of `WIDTH` lanes) of a vector's table.
fn part<L: Lanes>(at: &[i32; LANES], part: usize) -> &[i32] {
    &at[part * L::WIDTH..][..L::WIDTH]
}

impl Lanes for [f32; LANES] {
    const WIDTH: usize = LANES;
    #[inline(always)]
    unsafe fn load(p: *const f32, n: usize) -> Self {
        let mut v = [0f32; LANES];
        // SAFETY: the caller's.
        unsafe { std::ptr::copy_nonoverlapping(p, v.as_mut_ptr(), n) };
        v
    }
    #[inline(always)]
    unsafe fn store(self, p: *mut f32, n: usize) {
        // SAFETY: the caller's.
        unsafe { std::ptr::copy_nonoverlapping(self.as_ptr(), p, n) };
    }
    #[inline(always)]
    fn add(self, o: Self) -> Self {
        std::array::from_fn(|i| self[i] + o[i])
    }
    #[inline(always)]
    fn sub(self, o: Self) -> Self {
        std::array::from_fn(|i| self[i] - o[i])
    }
    #[inline(always)]
    fn splat(v: f32) -> Self {
        [v; LANES]
    }
    #[inline(always)]
    fn relu(self) -> Self {
        self.map(|x| if x > 0.0 { x } else { 0.0 })
    }
    #[inline(always)]
    unsafe fn gather(x: &[f32], at: &[i32]) -> Self {
        std::array::from_fn(|l| if at[l] >= 0 { x[at[l] as usize] } else { 0.0 })
    }
    #[inline(always)]
    unsafe fn scatter(self, x: &mut [f32], at: &[i32]) {
        for (&v, &i) in self.iter().zip(at) {
            if i >= 0 {
                x[i as usize] = v;
            }
        }
    }
    #[inline(always)]
    fn even_odd(row: &[f32], first: isize) -> (Self, Self) {
        let at = |i: isize| {
            usize::try_from(first + i)
                .ok()
                .and_then(|i| row.get(i))
                .copied()
                .unwrap_or(0.0)
        };
        (
            std::array::from_fn(|l| at(2 * l as isize)),
            std::array::from_fn(|l| at(2 * l as isize + 1)),
        )
    }
    #[inline(always)]
    fn interleave(a: Self, b: Self) -> (Self, Self) {
        let ab = |i: usize| {
            if i.is_multiple_of(2) {
                a[i / 2]
            } else {
                b[i / 2]
            }
        };
        (
            std::array::from_fn(ab),
            std::array::from_fn(|i| ab(i + LANES)),
        )
    }
}

/// Where the transformed input of vectors `first..` goes: `[k][block][c][NV * LANES]`, what
/// one tile kernel reads contiguous (it read 176 strided streams before, too many for the
/// prefetcher).
#[derive(Clone, Copy)]
struct Layout {
    channels: usize,
    blocks: usize,
    first: usize,
}

impl Layout {
    /// Where channel `ci`'s vector `v` of position `k` starts.
    fn at(&self, k: usize, v: usize, ci: usize) -> usize {
        let v = v - self.first;
        ((k * self.blocks + v / NV) * self.channels + ci) * NV * LANES + (v % NV) * LANES
    }

    /// From position `k`'s floats to position `k + 1`'s.
    fn k_stride(&self) -> usize {
        self.blocks * self.channels * NV * LANES
    }
}

/// `B^T d B` of part `part` of vector `v`'s patches `d` (`[i][j]`), into `u`
/// (`[k][block][c][NV * LANES]`).
///
/// # Safety
/// `u` holds the whole transformed input, of which no other thread writes channel `ci`'s.
// The index runs down the columns of a 4x4 array: clearer than the iterators.
#[allow(clippy::needless_range_loop)]
#[inline(always)]
unsafe fn store_input<L: Lanes>(
    layout: Layout,
    d: [[L; 4]; 4],
    (v, part): (usize, usize),
    ci: usize,
    u: *mut f32,
) {
    // B^T down each column, then across each row.
    let mut cols = [[L::splat(0.0); 4]; 4];
    for (j, col) in cols.iter_mut().enumerate() {
        *col = bt([d[0][j], d[1][j], d[2][j], d[3][j]]);
    }
    // Positions `k = 4 i + j` in order, one stride apart: a walked pointer, not 16 of them.
    let mut out = [L::splat(0.0); K];
    for i in 0..4 {
        let t = bt([cols[0][i], cols[1][i], cols[2][i], cols[3][i]]);
        out[i * 4..][..4].copy_from_slice(&t);
    }
    let at = layout.at(0, v, ci) + part * L::WIDTH;
    // SAFETY: `at + k step..` and `WIDTH` floats on, for every position `k`, are inside `u`
    // (the caller's), and channel `ci`'s.
    unsafe { L::store16(out, u.add(at), layout.k_stride()) };
}

/// The 16 positions of a transformed patch as its rows.
#[inline(always)]
fn as_4x4<L: Lanes>(v: [L; K]) -> [[L; 4]; 4] {
    let mut m = [[v[0]; 4]; 4];
    for (k, v) in v.into_iter().enumerate() {
        m[k / 4][k % 4] = v;
    }
    m
}

/// `B^T d` along one axis: `(d0 - d2, d1 + d2, d2 - d1, d1 - d3)`.
#[inline(always)]
fn bt<L: Lanes>(d: [L; 4]) -> [L; 4] {
    [
        d[0].sub(d[2]),
        d[1].add(d[2]),
        d[2].sub(d[1]),
        d[1].sub(d[3]),
    ]
}

/// `A^T m` along one axis: `(m0 + m1 + m2, m1 - m2 - m3)`.
#[inline(always)]
fn a_t<L: Lanes>(m: [L; 4]) -> [L; 2] {
    [m[0].add(m[1]).add(m[2]), m[1].sub(m[2]).sub(m[3])]
}

impl Winograd {
    /// The plan for a 3x3, stride 1, dilation 1 convolution of geometry `geo` with weights
    /// `w` (`[m][c][3][3]`); `None` for any other.
    pub(super) fn new(geo: &Geometry, m: usize, w: &[f32]) -> Option<Winograd> {
        let g = geo;
        // A dilated convolution's phases must be large enough to tile: on the ASPP's 16x16
        // map at dilation 6 and more, the direct kernel's skipping of taps that read only
        // padding does less work.
        if (g.kh, g.kw, g.sy, g.sx) != (3, 3, 1, 1)
            || g.dy != g.dx
            || g.oh / g.dy < 8
            || g.ow / g.dx < 8
            || g.h * g.w > i32::MAX as usize
            || g.oh * g.ow > i32::MAX as usize
        {
            return None;
        }
        let c = g.c;
        let panels = m.div_ceil(MR);
        let mut weights = vec![0f32; K * panels * c * MR];
        // G = [[1, 0, 0], [1/2, 1/2, 1/2], [1/2, -1/2, 1/2], [0, 0, 1]].
        let gm = [
            [1.0, 0.0, 0.0],
            [0.5, 0.5, 0.5],
            [0.5, -0.5, 0.5],
            [0.0, 0.0, 1.0f32],
        ];
        for mi in 0..m {
            for ci in 0..c {
                let f = &w[(mi * c + ci) * 9..][..9];
                // G f, then (G f) G^T.
                let gf: [[f32; 3]; 4] = std::array::from_fn(|i| {
                    std::array::from_fn(|j| (0..3).map(|l| gm[i][l] * f[l * 3 + j]).sum())
                });
                for (i, gf) in gf.iter().enumerate() {
                    for (j, gm) in gm.iter().enumerate() {
                        let v: f32 = (0..3).map(|l| gf[l] * gm[l]).sum();
                        let k = i * 4 + j;
                        weights[((k * panels + mi / MR) * c + ci) * MR + mi % MR] = v;
                    }
                }
            }
        }
        let (th, tw) = (g.oh.div_ceil(2), g.ow / 2);
        // Tile rows of whole vectors (`ow` a multiple of 32) are read in place; otherwise
        // through tables.
        let gathered = (g.dy != 1 || !g.ow.is_multiple_of(2 * LANES)).then(|| Gathered::new(g));
        let vectors = match &gathered {
            Some(t) => t.vectors(),
            None => th * tw / LANES,
        };
        let mut tpad = vectors * LANES;
        // The output transform reads one vector per position, `m * tpad` floats apart: an
        // even number of cache lines (4 KiB for a 64x64 map) maps them to a few L1 sets.
        if vectors.is_multiple_of(2) {
            tpad += LANES;
        }
        Some(Winograd {
            weights: Floats(Arc::new(weights)),
            th,
            tw,
            vectors,
            blocks: vectors.div_ceil(NV),
            tpad,
            gathered,
        })
    }
}

impl FConv {
    /// The convolution of `input` into `out` (`[m][oh][ow]`) by [`Winograd`].
    pub(super) fn run_winograd(
        &self,
        wg: &Winograd,
        input: Planes,
        residual: Option<&[f32]>,
        out: &mut [f32],
    ) {
        let g = &self.geo;
        let (c, m, tpad) = (g.c, self.m, wg.tpad);
        let mut v: Vec<f32> = Vec::with_capacity(K * m * tpad);
        let ptr = SendPtr(v.spare_capacity_mut().as_mut_ptr().cast::<f32>());
        let threads = crate::threads::threads();
        if wg.blocks >= 4 * threads {
            // Enough blocks to share: each block's transformed input is made, multiplied and
            // dropped while in cache (the whole of it for the decoder's 64x64 map is 11.5 MB,
            // written and read back through memory, which two threads did not make faster).
            let layout = |b: usize| Layout {
                channels: c,
                blocks: 1,
                first: b * NV,
            };
            crate::threads::parallel_rows(wg.blocks, |blocks| {
                let ptr = &ptr;
                // Zeroed once: a last block of fewer than `NV` vectors leaves the rest as it is
                // (finite, and never read).
                let mut u = vec![0f32; K * c * NV * LANES];
                for b in blocks {
                    let vectors = b * NV..((b + 1) * NV).min(wg.vectors);
                    for ci in 0..c {
                        // SAFETY: `u` is this thread's and holds the block.
                        unsafe {
                            self.transform_input(
                                wg,
                                input,
                                ci,
                                vectors.clone(),
                                layout(b),
                                u.as_mut_ptr(),
                            )
                        };
                    }
                    for k in 0..K {
                        for p in 0..self.panels() {
                            // SAFETY: items write disjoint blocks of `v`.
                            unsafe { self.multiply(wg, &u, k, k, b, p, ptr.0) };
                        }
                    }
                }
            });
        } else {
            let u_len = K * wg.blocks * c * NV * LANES;
            let layout = Layout {
                channels: c,
                blocks: wg.blocks,
                first: 0,
            };
            let mut u: Vec<f32> = Vec::with_capacity(u_len);
            let uptr = SendPtr(u.spare_capacity_mut().as_mut_ptr().cast::<f32>());
            crate::threads::parallel_rows(c, |channels| {
                let uptr = &uptr;
                for ci in channels {
                    // SAFETY: channel `ci`'s vectors of `u` are this thread's alone.
                    unsafe { self.transform_input(wg, input, ci, 0..wg.vectors, layout, uptr.0) };
                    // A last block of fewer than `NV` vectors: the rest (never read) zeroed.
                    for k in 0..K {
                        for v in wg.vectors..wg.blocks * NV {
                            // SAFETY: inside `u`, channel `ci`'s.
                            unsafe {
                                std::ptr::write_bytes(uptr.0.add(layout.at(k, v, ci)), 0, LANES)
                            };
                        }
                    }
                }
            });
            // SAFETY: every float of `u` was written just above.
            unsafe { u.set_len(u_len) };
            let panels = self.panels();
            crate::threads::parallel_rows(K * wg.blocks * panels, |items| {
                let ptr = &ptr;
                for i in items {
                    let (kb, p) = (i / panels, i % panels);
                    let (k, b) = (kb / wg.blocks, kb % wg.blocks);
                    // SAFETY: items write disjoint blocks of `v`.
                    unsafe { self.multiply(wg, &u, kb, k, b, p, ptr.0) };
                }
            });
        }
        // SAFETY: the product wrote every float but the line of padding a channel.
        unsafe { v.set_len(K * m * tpad) };
        crate::threads::parallel_parts(out, g.oh * g.ow, |channels, part| {
            for (mi, plane) in channels.zip(part.chunks_mut(g.oh * g.ow)) {
                let r = residual.map(|r| &r[mi * g.oh * g.ow..][..g.oh * g.ow]);
                self.transform_output(wg, &v, mi, r, plane);
            }
        });
    }

    /// Position `k`'s product for block `b` (in `u`, at block `at`) and panel `p`, into `v`
    /// (`[k][m][tpad]`).
    ///
    /// # Safety
    /// `v` holds `K * m * tpad` floats, of which no other thread writes these.
    #[allow(clippy::too_many_arguments)]
    unsafe fn multiply(
        &self,
        wg: &Winograd,
        u: &[f32],
        at: usize,
        k: usize,
        b: usize,
        p: usize,
        v: *mut f32,
    ) {
        let (c, m, tpad) = (self.geo.c, self.m, wg.tpad);
        let panels = self.panels();
        let block = c * NV * LANES;
        let n = (wg.vectors - b * NV).min(NV);
        let offsets: [usize; NV] = std::array::from_fn(|j| j * LANES);
        let pixels: [(usize, usize); NV] = std::array::from_fn(|j| ((b * NV + j) * LANES, LANES));
        let job = Job {
            x: &u[at * block..][..block],
            w: &wg.weights.0[(k * panels + p) * c * MR..][..c * MR],
            taps: &[(0, 0)],
            at: &offsets[..n],
            channels: c,
            plane: NV * LANES,
            channel_w: MR,
        };
        let store = Store {
            // SAFETY: position `k`'s block of `v`.
            out: unsafe { v.add(k * m * tpad) },
            residual: None,
            relu: false,
            pixels: tpad,
            first: p * MR,
            rows: (m - p * MR).min(MR),
            at: &pixels[..n],
        };
        let zeros = [0f32; MR];
        // SAFETY: every read is inside `u` and the weights (the slices above); the writes are
        // the caller's.
        unsafe {
            match self.kernel {
                Kernel::Portable => Portable::tile(&job, &zeros, &store),
                #[cfg(target_arch = "x86_64")]
                Kernel::Avx512 => super::x86_64::tile(&job, &zeros, &store),
                #[cfg(target_arch = "aarch64")]
                Kernel::Neon => super::aarch64::tile(&job, &zeros, &store),
            }
        }
    }

    /// `B^T d B` for the tiles of vectors `vectors` of channel `ci`, into `u` (`[k][c][tpad]`).
    ///
    /// # Safety
    /// `u` holds `K * c * tpad` floats, of which no other thread writes channel `ci`'s.
    unsafe fn transform_input(
        &self,
        wg: &Winograd,
        x: Planes,
        ci: usize,
        vectors: Range<usize>,
        layout: Layout,
        u: *mut f32,
    ) {
        #[cfg(target_arch = "x86_64")]
        if self.kernel != Kernel::Portable {
            #[target_feature(enable = "avx512f")]
            unsafe fn wide(
                conv: &FConv,
                wg: &Winograd,
                x: Planes,
                ci: usize,
                vectors: Range<usize>,
                layout: Layout,
                u: *mut f32,
            ) {
                use std::arch::x86_64::__m512;
                // SAFETY: the caller's.
                unsafe { conv.transform_input_any::<__m512>(wg, x, ci, vectors, layout, u) }
            }
            // SAFETY: the caller's; a kernel other than the portable one means AVX-512 F.
            return unsafe { wide(self, wg, x, ci, vectors, layout, u) };
        }
        #[cfg(target_arch = "aarch64")]
        if self.kernel != Kernel::Portable {
            // SAFETY: the caller's.
            return unsafe {
                self.transform_input_any::<std::arch::aarch64::float32x4_t>(
                    wg, x, ci, vectors, layout, u,
                )
            };
        }
        // SAFETY: the caller's.
        unsafe { self.transform_input_any::<[f32; LANES]>(wg, x, ci, vectors, layout, u) }
    }

    /// # Safety
    /// As [`FConv::transform_input`].
    // The index runs down the columns of a 4x4 array: clearer than the iterators.
    #[allow(clippy::needless_range_loop)]
    #[inline(always)]
    unsafe fn transform_input_any<L: Lanes>(
        &self,
        wg: &Winograd,
        x: Planes,
        ci: usize,
        vectors: Range<usize>,
        layout: Layout,
        u: *mut f32,
    ) {
        let g = &self.geo;
        let x = x.plane(ci);
        let zero = L::splat(0.0);
        if let Some(tables) = &wg.gathered {
            for v in vectors {
                for p in 0..LANES / L::WIDTH {
                    let mut d = [[zero; 4]; 4];
                    for (i, row) in d.iter_mut().enumerate() {
                        for (j, e) in row.iter_mut().enumerate() {
                            let at = part::<L>(&tables.input[v * 16 + i * 4 + j], p);
                            // SAFETY: the tables' offsets are inside a channel's plane.
                            *e = unsafe { L::gather(x, at) };
                        }
                    }
                    // SAFETY: the caller's.
                    unsafe { store_input(layout, d, (v, p), ci, u) };
                }
            }
            return;
        }
        for v in vectors {
            // Vector `v`'s tiles are `LANES` neighbours in tile row `ty` (rows are whole
            // vectors), from column `tx`.
            let (ty, tx) = (v * LANES / wg.tw, v * LANES % wg.tw);
            // The patch's rows, `None` where they are padding. (Plain loops here, not
            // `array::from_fn`: its closures are functions of their own, compiled without
            // AVX-512, and the intrinsics in them were calls.)
            let mut rows: [Option<&[f32]>; 4] = [None; 4];
            for (i, r) in rows.iter_mut().enumerate() {
                let y = (2 * ty + i) as isize - g.pad_top;
                if (0..g.h as isize).contains(&y) {
                    *r = Some(&x[y as usize * g.w..][..g.w]);
                }
            }
            for p in 0..LANES / L::WIDTH {
                // Patch element (i, j) of part `p`'s tiles: row 2 ty + i, column 2 tx + j:
                // the even and odd columns from 2 tx - pad_left, and from 2 further.
                let first = (2 * (tx + p * L::WIDTH)) as isize - g.pad_left;
                // All rows are `g.w` long: one check for the four.
                let inside = first >= 0 && first as usize + 2 * L::WIDTH + 2 <= g.w;
                let mut d = [[zero; 4]; 4];
                for (d, row) in d.iter_mut().zip(rows) {
                    if let Some(row) = row {
                        let ((e0, o0), (e1, o1)) = if inside {
                            // SAFETY: `first..first + 2 WIDTH + 2` is inside `row`.
                            unsafe {
                                let at = row.as_ptr().add(first as usize);
                                (L::even_odd_inside(at), L::even_odd_inside(at.add(2)))
                            }
                        } else {
                            (L::even_odd(row, first), L::even_odd(row, first + 2))
                        };
                        *d = [e0, o0, e1, o1];
                    }
                }
                // SAFETY: the caller's.
                unsafe { store_input(layout, d, (v, p), ci, u) };
            }
        }
    }

    /// `A^T m A` for every tile of output channel `mi`, plus bias, residual and ReLU, into
    /// `out` (that channel's `oh x ow` plane).
    fn transform_output(
        &self,
        wg: &Winograd,
        v: &[f32],
        mi: usize,
        residual: Option<&[f32]>,
        out: &mut [f32],
    ) {
        #[cfg(target_arch = "x86_64")]
        if self.kernel != Kernel::Portable {
            #[target_feature(enable = "avx512f")]
            fn wide(
                conv: &FConv,
                wg: &Winograd,
                v: &[f32],
                mi: usize,
                residual: Option<&[f32]>,
                out: &mut [f32],
            ) {
                use std::arch::x86_64::__m512;
                conv.transform_output_any::<__m512>(wg, v, mi, residual, out)
            }
            // SAFETY: a kernel other than the portable one means AVX-512 F.
            return unsafe { wide(self, wg, v, mi, residual, out) };
        }
        #[cfg(target_arch = "aarch64")]
        if self.kernel != Kernel::Portable {
            return self
                .transform_output_any::<std::arch::aarch64::float32x4_t>(wg, v, mi, residual, out);
        }
        self.transform_output_any::<[f32; LANES]>(wg, v, mi, residual, out)
    }

    // The index runs down the columns of a 4x2 array: clearer than the iterators.
    #[allow(clippy::needless_range_loop)]
    #[inline(always)]
    fn transform_output_any<L: Lanes>(
        &self,
        wg: &Winograd,
        v: &[f32],
        mi: usize,
        residual: Option<&[f32]>,
        out: &mut [f32],
    ) {
        let (oh, ow, m, tpad) = (self.geo.oh, self.geo.ow, self.m, wg.tpad);
        assert!(out.len() == oh * ow && residual.is_none_or(|r| r.len() == oh * ow));
        assert!(v.len() == K * m * tpad);
        let bias = L::splat(self.bias.0[mi]);
        if let Some(tables) = &wg.gathered {
            let zero = L::splat(0.0);
            for (vi, p) in
                (0..wg.vectors).flat_map(|vi| (0..LANES / L::WIDTH).map(move |p| (vi, p)))
            {
                let at = mi * tpad + vi * LANES + p * L::WIDTH;
                // SAFETY: `(k, mi, at..at + WIDTH)` is inside `v` (asserted length).
                let mk = unsafe { L::load16(v.as_ptr().add(at), m * tpad) };
                let mk = as_4x4(mk);
                let mut cols = [[zero; 2]; 4];
                for (j, col) in cols.iter_mut().enumerate() {
                    *col = a_t([mk[0][j], mk[1][j], mk[2][j], mk[3][j]]);
                }
                for a in 0..2 {
                    let y = a_t([cols[0][a], cols[1][a], cols[2][a], cols[3][a]]);
                    for (b, mut y) in y.into_iter().enumerate() {
                        let at = part::<L>(&tables.output[vi * 4 + a * 2 + b], p);
                        y = y.add(bias);
                        if let Some(r) = residual {
                            // SAFETY: the tables' offsets are inside a channel's plane.
                            y = y.add(unsafe { L::gather(r, at) });
                        }
                        if self.relu {
                            y = y.relu();
                        }
                        // SAFETY: as above; a tile's outputs are distinct pixels.
                        unsafe { y.scatter(out, at) };
                    }
                }
            }
            return;
        }
        for ty in 0..wg.th {
            for tx in (0..wg.tw).step_by(L::WIDTH) {
                let n = (wg.tw - tx).min(L::WIDTH);
                let at = ty * wg.tw + tx;
                let zero = L::splat(0.0);
                let mut mk = [zero; K];
                let from = v[mi * tpad + at..].as_ptr();
                if n == L::WIDTH {
                    // SAFETY: `(k, mi, at..at + n)` is inside `v` (asserted lengths).
                    mk = unsafe { L::load16(from, m * tpad) };
                } else {
                    for (k, e) in mk.iter_mut().enumerate() {
                        // SAFETY: as above.
                        *e = unsafe { L::load(from.add(k * m * tpad), n) };
                    }
                }
                let mk = as_4x4(mk);
                let mut cols = [[zero; 2]; 4];
                for (j, col) in cols.iter_mut().enumerate() {
                    *col = a_t([mk[0][j], mk[1][j], mk[2][j], mk[3][j]]);
                }
                // Output columns 2 tx .. 2 (tx + n), cropped to the width.
                let width = (2 * n).min(ow - 2 * tx);
                for a in 0..2 {
                    let oy = 2 * ty + a;
                    if oy >= oh {
                        break;
                    }
                    let y = a_t([cols[0][a], cols[1][a], cols[2][a], cols[3][a]]);
                    let (lo, hi) = L::interleave(y[0], y[1]);
                    let row = oy * ow + 2 * tx;
                    for (h, mut y) in [lo, hi].into_iter().enumerate() {
                        let len = width.saturating_sub(h * L::WIDTH).min(L::WIDTH);
                        if len == 0 {
                            break;
                        }
                        let at = row + h * L::WIDTH;
                        y = y.add(bias);
                        if let Some(r) = residual {
                            // SAFETY: `at + len <= oh * ow`, the residual's length.
                            y = y.add(unsafe { L::load(r.as_ptr().add(at), len) });
                        }
                        if self.relu {
                            y = y.relu();
                        }
                        // SAFETY: as above, `out`'s length.
                        unsafe { y.store(out.as_mut_ptr().add(at), len) };
                    }
                }
            }
        }
    }
}
