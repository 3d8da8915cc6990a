// One core's float multiply-add ceiling, the yardstick of BENCHMARKS.md's f32 section:
// independent AVX-512 FMAs (the peak), FMA latency (the clock), and FConv's inner loop
// (3 vector loads, 8 weight broadcasts, 24 FMAs) from L1 with aligned and unaligned loads.
//   gcc -O2 bench/fma_peak.c -o /tmp/fma_peak && /tmp/fma_peak
#include <stdio.h>
#include <time.h>
static float buf[4096] __attribute__((aligned(64)));
static double now(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec + t.tv_nsec * 1e-9;
}
#define FMA3(w, a0, a1, a2) "vbroadcastss " w "(%2),%%zmm27\n vfmadd231ps %%zmm24,%%zmm27," a0 "\n vfmadd231ps %%zmm25,%%zmm27," a1 "\n vfmadd231ps %%zmm26,%%zmm27," a2 "\n"
#define TILE(o0, o1, o2) \
  "vmovups " o0 "(%1),%%zmm24\n vmovups " o1 "(%1),%%zmm25\n vmovups " o2 "(%1),%%zmm26\n" \
  FMA3("0", "%%zmm0", "%%zmm1", "%%zmm2") FMA3("4", "%%zmm3", "%%zmm4", "%%zmm5") \
  FMA3("8", "%%zmm6", "%%zmm7", "%%zmm8") FMA3("12", "%%zmm9", "%%zmm10", "%%zmm11") \
  FMA3("16", "%%zmm12", "%%zmm13", "%%zmm14") FMA3("20", "%%zmm15", "%%zmm16", "%%zmm17") \
  FMA3("24", "%%zmm18", "%%zmm19", "%%zmm20") FMA3("28", "%%zmm21", "%%zmm22", "%%zmm23")
int main(void) {
  const long n = 50000000;
  float *x = buf, *w = buf + 2048;
  long k = n;
  double t0 = now();
  __asm__ volatile("1:\n .rept 24\n vfmadd231ps %%zmm30,%%zmm31,%%zmm1\n .endr\n dec %0\n jnz 1b\n"
                   : "+r"(k)::"memory");
  double lat = (now() - t0) / (n * 24.0);
  printf("FMA latency %.2f ns: %.2f GHz at 4 cycles\n", lat * 1e9, 4 / lat / 1e9);
  k = n;
  t0 = now();
  __asm__ volatile("1:\n"
                   ".irp r,0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15\n vfmadd231ps %%zmm30,%%zmm31,%%zmm\\r\n .endr\n"
                   "dec %0\n jnz 1b\n" : "+r"(k)::"memory");
  printf("independent FMAs: %.1f GFLOP/s\n", n * 16 * 32 / (now() - t0) / 1e9);
  k = n;
  t0 = now();
  __asm__ volatile("1:\n" TILE("0", "256", "512") "dec %0\n jnz 1b\n" : "+r"(k) : "r"(x), "r"(w) : "memory");
  printf("tile loop, aligned loads: %.1f GFLOP/s\n", n * 24 * 32 / (now() - t0) / 1e9);
  k = n;
  t0 = now();
  __asm__ volatile("1:\n" TILE("4", "260", "516") "dec %0\n jnz 1b\n" : "+r"(k) : "r"(x), "r"(w) : "memory");
  printf("tile loop, unaligned loads: %.1f GFLOP/s\n", n * 24 * 32 / (now() - t0) / 1e9);
  return 0;
}
