//! Run-time dispatch to code compiled for the CPU's vector extensions.

/// Whether this CPU has AVX-512 F and BW, for the operators that have a copy compiled for them
/// (the same code, so the same results, on 16 lanes instead of 4).
#[cfg(target_arch = "x86_64")]
pub(crate) fn has_avx512() -> bool {
    std::arch::is_x86_feature_detected!("avx512f")
        && std::arch::is_x86_feature_detected!("avx512bw")
}

/// `impl $ty { fn $run(&self, ..) }` that calls `self.$any(..)` (an `#[inline(always)]` loop)
/// through a copy compiled for AVX-512 where the CPU has it: the same operations on 16 lanes
/// instead of 4, so the same results.
macro_rules! with_avx512_copy {
    ($ty:ty, $run:ident, $any:ident, $xs:ident: $xt:ty, $ys:ident: $yt:ty) => {
        impl $ty {
            fn $run(&self, $xs: $xt, $ys: $yt) {
                #[cfg(target_arch = "x86_64")]
                if $crate::simd::has_avx512() {
                    #[target_feature(enable = "avx512f,avx512bw")]
                    unsafe fn wide(this: &$ty, $xs: $xt, $ys: $yt) {
                        this.$any($xs, $ys)
                    }
                    // SAFETY: the CPU has AVX-512 F and BW.
                    return unsafe { wide(self, $xs, $ys) };
                }
                self.$any($xs, $ys)
            }
        }
    };
}
pub(crate) use with_avx512_copy;
