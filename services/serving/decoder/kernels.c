/* idealrt native kernels for the pytorch backend's CPU decode step (compiled at first use by
   idealrt.services.serving.decoder.native with -O3 -march=native -fopenmp).

 y[N] = x[K] @ W[K,N] (+ b): W row-major [in, out]. Four input rows per pass over y so
   each weight byte is read once, from four sequential streams; threads split the columns. */
#include <omp.h>
#include <stddef.h>

static void span(const float* restrict x, const float* restrict W, const float* restrict b,
                 float* restrict y, long K, long N, long c0, long c1) {
  for (long j = c0; j < c1; j++) y[j] = b ? b[j] : 0.0f;
  long k = 0;
  for (; k + 4 <= K; k += 4) {
    const float a0 = x[k], a1 = x[k + 1], a2 = x[k + 2], a3 = x[k + 3];
    const float* restrict w0 = W + k * N;
    const float* restrict w1 = w0 + N;
    const float* restrict w2 = w1 + N;
    const float* restrict w3 = w2 + N;
#pragma omp simd
    for (long j = c0; j < c1; j++) y[j] += a0 * w0[j] + a1 * w1[j] + a2 * w2[j] + a3 * w3[j];
  }
  for (; k < K; k++) {
    const float a = x[k];
    const float* restrict w = W + k * N;
#pragma omp simd
    for (long j = c0; j < c1; j++) y[j] += a * w[j];
  }
}
void idealrt_gemv_f32(const float* x, const float* W, const float* b, float* y, long K, long N,
                      int threads) {
  /* below ~1 MB of weights a second thread costs more than it saves (as ATen's grain) */
  if (threads <= 1 || K * N < (1L << 18)) {
    span(x, W, b, y, K, N, 0, N);
    return;
  }
#pragma omp parallel num_threads(threads)
  {
    int t = omp_get_thread_num(), n = omp_get_num_threads();
    long per = ((N + n - 1) / n + 15) / 16 * 16;
    long c0 = t * per, c1 = c0 + per < N ? c0 + per : N;
    if (c0 < c1) span(x, W, b, y, K, N, c0, c1);
  }
}

/* exp(x) for x <= 0 (softmax after subtracting the max) on 16 floats at once: Cephes' expf
   polynomial after range reduction x = n ln2 + r, relative error ~7e-8 (x below -87 flushes
   to exp(-87)). Written in GCC/Clang vector extensions, so the compiler emits the target's
   widest SIMD (one AVX-512 register, two AVX2 ones, four NEON ones): a loop over a scalar
   version did not vectorise (GCC 12 turns the clamp into a branch) and the softmax ran at
   ~6 cycles a score, 12.8 us of a 12-head 513-key step; 2.1 us this way. floor is the
   truncation corrected where it rounded up. */
typedef float vf16 __attribute__((vector_size(64)));
typedef int vi16 __attribute__((vector_size(64)));
static inline vf16 vexp_nonpos(vf16 x) {
  const vi16 low = x < -87.0f;
  x = (vf16)(((vi16)x & ~low) | ((vi16)(x * 0.0f - 87.0f) & low));
  const vf16 y = x * 1.44269504088896341f + 0.5f;
  vi16 k = __builtin_convertvector(y, vi16);
  k += (vi16)(__builtin_convertvector(k, vf16) > y);
  const vf16 n = __builtin_convertvector(k, vf16);
  const vf16 r = x - n * 0.693359375f + n * 2.12194440e-4f;
  vf16 p = r * 0.0f + 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  return p * (vf16)((k + 127) << 23);
}

/* s[0..L) = exp(s - max s) in place; returns their sum. */
static float softmax_exp(float* restrict s, long L) {
  float m = -3.0e38f;
#pragma omp simd reduction(max : m)
  for (long j = 0; j < L; j++) m = s[j] > m ? s[j] : m;
  vf16 acc = {0};
  long j = 0;
  for (; j + 16 <= L; j += 16) {
    vf16 v;
    __builtin_memcpy(&v, s + j, sizeof v);
    v = vexp_nonpos(v - m);
    __builtin_memcpy(s + j, &v, sizeof v);
    acc += v;
  }
  float sum = 0.0f;
  for (int i = 0; i < 16; i++) sum += acc[i];
  if (j < L) { /* the last L - j < 16 scores, padded with m */
    vf16 v;
    for (int i = 0; i < 16; i++) v[i] = j + i < L ? s[j + i] : m;
    v = vexp_nonpos(v - m);
    for (long i = 0; j + i < L; i++) {
      s[j + i] = v[i];
      sum += v[i];
    }
  }
  return sum;
}

/* r[i] = the sum of v[i]'s 16 lanes, for 16 vectors at once: a transpose-and-add tree (45
   shuffles and adds for 16 sums, where 16 separate reductions take ~130 instructions). The
   index lists are those of AVX-512's unpack{lo,hi}_ps, unpack{lo,hi}_pd and shuffle_f32x4.
   GCC spells the two-vector shuffle __builtin_shuffle (since 4.7; __builtin_shufflevector
   only since 12), Clang __builtin_shufflevector. */
#if defined(__clang__)
#define SHUF(a, b, ...) __builtin_shufflevector(a, b, __VA_ARGS__)
#else
#define SHUF(a, b, ...) __builtin_shuffle(a, b, (vi16){__VA_ARGS__})
#endif
#define LANES4(a, b, c, d) a, b, c, d, a + 4, b + 4, c + 4, d + 4, a + 8, b + 8, c + 8, d + 8, \
                           a + 12, b + 12, c + 12, d + 12
static inline vf16 hsum16(const vf16* v) {
  vf16 c[4];
  for (int g = 0; g < 4; g++) {
    const vf16* w = v + 4 * g;
    const vf16 a = SHUF(w[0], w[1], LANES4(0, 16, 1, 17)) + SHUF(w[0], w[1], LANES4(2, 18, 3, 19));
    const vf16 b = SHUF(w[2], w[3], LANES4(0, 16, 1, 17)) + SHUF(w[2], w[3], LANES4(2, 18, 3, 19));
    c[g] = SHUF(a, b, LANES4(0, 1, 16, 17)) + SHUF(a, b, LANES4(2, 3, 18, 19));
  }
#define EVEN_LANES 0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27
#define ODD_LANES 4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31
  const vf16 e01 = SHUF(c[0], c[1], EVEN_LANES) + SHUF(c[0], c[1], ODD_LANES);
  const vf16 e23 = SHUF(c[2], c[3], EVEN_LANES) + SHUF(c[2], c[3], ODD_LANES);
  return SHUF(e01, e23, EVEN_LANES) + SHUF(e01, e23, ODD_LANES);
}

/* Chunk c (16 floats) of a D-float row; the last chunk of a head size that is not a
   multiple of 16 is zero-padded. */
static inline vf16 chunk(const float* row, long c, long D) {
  vf16 v = {0};
  const long n = D - 16 * c < 16 ? D - 16 * c : 16;
  __builtin_memcpy(&v, row + 16 * c, (size_t)n * sizeof(float));
  return v;
}

#define BLOCK 16      /* cache rows per score block: one hsum16 */
#define PREFETCH 12   /* rows ahead, per stream (measured best of 8-20 on the reference EPYC) */

/* One head's softmax(q.K + ALiBi) V over L cache rows (q already scaled). The cache is cold
   (the step's weight stream evicted it) and reading it is the whole cost, so both passes
   read their rows as two sequential streams (the halves of the range) with software
   prefetch PREFETCH rows ahead in each (past the last row it touches unused slots or the
   next head's rows: a prefetch never faults), and keep the instructions per byte low:
   scores come 16 rows at a time from 16 vector accumulators reduced by one hsum16 tree, and
   the weighted V sum stays in registers. Measured on the reference EPYC (1 thread, GPT-2
   small's decode step, old and new kernel in one process, interleaved rounds): the extra
   time 128 -> 512 keys fell from 0.81-1.00 ms to 0.67-0.68 ms, i.e. the cache now reads at
   ~42 GB/s at the margin (28-35 before, four streams and one reduction per score); a plain
   vector sum over the same bytes reads at ~44. C = D/16 rounded up is a compile-time
   constant in the head-size-specific instances. */
static inline __attribute__((always_inline)) void attend_head(
    const float* restrict Kh, const float* restrict Vh, const float* restrict qh,
    float* restrict s, float* restrict out, long L, long lo, const float* alibi_slope,
    const long D, const long C) {
  vf16 q[C];
  for (long c = 0; c < C; c++) q[c] = chunk(qh, c, D);
  const long nb = L / BLOCK, half = nb * (BLOCK / 2);
  for (long i = 0; i < nb; i++) {
    vf16 acc[BLOCK];
#pragma GCC unroll 16
    for (int r = 0; r < BLOCK; r++) {
      const long j = (r < BLOCK / 2 ? 0 : half - BLOCK / 2) + i * (BLOCK / 2) + r;
      const float* row = Kh + j * D;
      for (long c = 0; c < C; c++) __builtin_prefetch(row + PREFETCH * D + 16 * c, 0, 3);
      vf16 a = q[0] * chunk(row, 0, D);
      for (long c = 1; c < C; c++) a += q[c] * chunk(row, c, D);
      acc[r] = a;
    }
    const vf16 t = hsum16(acc);
    __builtin_memcpy(s + i * (BLOCK / 2), &t, sizeof(float) * (BLOCK / 2));
    __builtin_memcpy(s + half + i * (BLOCK / 2), (const float*)&t + BLOCK / 2,
                     sizeof(float) * (BLOCK / 2));
  }
  for (long j = 2 * half; j < L; j++) {
    const float* row = Kh + j * D;
    vf16 a = q[0] * chunk(row, 0, D);
    for (long c = 1; c < C; c++) a += q[c] * chunk(row, c, D);
    float sum = 0.0f;
    for (int k = 0; k < 16; k++) sum += a[k];
    s[j] = sum;
  }
  if (alibi_slope) {
    const float slope = *alibi_slope;
#pragma omp simd
    for (long j = 0; j < L; j++) s[j] += slope * (float)(lo + j);
  }
  const float inv = 1.0f / softmax_exp(s, L);
  vf16 o[C];
  for (long c = 0; c < C; c++) o[c] = (vf16){0};
  for (long j0 = 0; j0 < half; j0++) {
    const long j1 = half + j0;
    const float p0 = s[j0], p1 = s[j1];
    const float* r0 = Vh + j0 * D;
    const float* r1 = Vh + j1 * D;
    for (long c = 0; c < C; c++) {
      __builtin_prefetch(r0 + PREFETCH * D + 16 * c, 0, 3);
      __builtin_prefetch(r1 + PREFETCH * D + 16 * c, 0, 3);
    }
    for (long c = 0; c < C; c++) o[c] += p0 * chunk(r0, c, D) + p1 * chunk(r1, c, D);
  }
  for (long j = 2 * half; j < L; j++)
    for (long c = 0; c < C; c++) o[c] += s[j] * chunk(Vh + j * D, c, D);
  for (long c = 0; c < C; c++) {
    const vf16 y = o[c] * inv;
    const long n = D - 16 * c < 16 ? D - 16 * c : 16;
    __builtin_memcpy(out + 16 * c, &y, (size_t)n * sizeof(float));
  }
}

/* Rotary position embedding of one head vector in place, as the reference decoder's
   `_rotate`: cos/sin are the position's rows (rot floats); "halves" pairs i with i + rot/2
   (NeoX, Llama), "interleaved" pairs 2i with 2i+1 (GPT-J); dims >= rot pass through. */
static void rotate(float* x, const float* cs, const float* sn, long rot, int interleaved) {
  if (interleaved) {
    for (long i = 0; i + 1 < rot; i += 2) {
      const float a = x[i], b = x[i + 1];
      x[i] = a * cs[i] - b * sn[i];
      x[i + 1] = b * cs[i + 1] + a * sn[i + 1];
    }
    return;
  }
  const long half = rot / 2;
  for (long i = 0; i < half; i++) {
    const float a = x[i], b = x[i + half];
    x[i] = a * cs[i] - b * sn[i];
    x[i + half] = b * cs[i + half] + a * sn[i + half];
  }
}

/* One decode step's attention for one layer, from the layer's qkv projection row
   [heads*D | kv_heads*D | kv_heads*D]: rotary on q and k (rot > 0), k and v written into
   the cache [kv_heads, head_stride/D, D] at row pos, then each query head attends keys
   lo..pos (ALiBi bias alibi[h] * key position when alibi is not NULL) and writes its D
   outputs to out[h*D..] (the [1, heads*D] row the output projection reads). q_rot is
   heads*D floats of scratch; scratch holds heads * (pos + 1 - lo) floats. */
void idealrt_attend_step_f32(const float* qkv, float* K, float* V, float* out, float* q,
                             float* scratch, long heads, long kv_heads, long head_stride,
                             long pos, long lo, long D, float scale, const float* cs,
                             const float* sn, long rot, int interleaved, const float* alibi,
                             int threads) {
  const long groups = heads / kv_heads;
  const float* kin = qkv + heads * D;
  const float* vin = kin + kv_heads * D;
  for (long h = 0; h < heads * D; h++) q[h] = qkv[h];
  for (long g = 0; g < kv_heads; g++) {
    float* krow = K + g * head_stride + pos * D;
    float* vrow = V + g * head_stride + pos * D;
    for (long d = 0; d < D; d++) {
      krow[d] = kin[g * D + d];
      vrow[d] = vin[g * D + d];
    }
    if (rot > 0) rotate(krow, cs, sn, rot, interleaved);
  }
  if (rot > 0)
    for (long h = 0; h < heads; h++) rotate(q + h * D, cs, sn, rot, interleaved);
  for (long i = 0; i < heads * D; i++) q[i] *= scale; /* once, not per score */
  const long end = pos + 1;
  const long L = end - lo;
#pragma omp parallel for num_threads(threads > 1 ? threads : 1) schedule(static) \
    if (heads * L * D >= (1L << 16))
  for (long h = 0; h < heads; h++) {
    const long g = h / groups;
    const float* Kh = K + g * head_stride + lo * D;
    const float* Vh = V + g * head_stride + lo * D;
    const float* slope = alibi ? alibi + h : NULL;
    float* s = scratch + h * L;
    if (D == 64) attend_head(Kh, Vh, q + h * D, s, out + h * D, L, lo, slope, 64, 4);
    else if (D == 128) attend_head(Kh, Vh, q + h * D, s, out + h * D, L, lo, slope, 128, 8);
    else attend_head(Kh, Vh, q + h * D, s, out + h * D, L, lo, slope, D, (D + 15) / 16);
  }
}
