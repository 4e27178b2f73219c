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
  if (threads <= 1) { span(x, W, b, y, K, N, 0, N); return; }
#pragma omp parallel num_threads(threads)
  {
    int t = omp_get_thread_num(), n = omp_get_num_threads();
    long per = ((N + n - 1) / n + 15) / 16 * 16;
    long c0 = t * per, c1 = c0 + per < N ? c0 + per : N;
    if (c0 < c1) span(x, W, b, y, K, N, c0, c1);
  }
}

/* exp(x) for x <= 0 (softmax after subtracting the max): Cephes' expf polynomial after
   range reduction x = n ln2 + r; plain arithmetic, so the compiler vectorises the loop that
   calls it. Relative error ~2e-7; x below -87 flushes to exp(-87). */
static inline float exp_nonpos(float x) {
  x = x < -87.0f ? -87.0f : x;
  float n = __builtin_floorf(x * 1.44269504088896341f + 0.5f);
  float r = x - n * 0.693359375f + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  union { int i; float f; } scale;
  scale.i = ((int)n + 127) << 23;
  return p * scale.f;
}

/* One query token attending keys lo..end-1 of a [heads_kv, stride/D, D] cache (K and V
   rows contiguous per head): out[h] = softmax(scale * q[h] . K[kv(h)]) . V[kv(h)], with
   kv(h) = h / groups (grouped-query heads as in the reference decoder). scratch holds
   heads * (end - lo) floats. Head sizes 64 and 128 get loops with a compile-time width
   (accumulators stay in registers); others take the generic loop. Threads split heads. */
#define ATTEND_HEAD(DIM)                                                                   \
  {                                                                                        \
    const float* restrict Kh = K + (h / groups) * head_stride + lo * DIM;                  \
    const float* restrict Vh = V + (h / groups) * head_stride + lo * DIM;                  \
    const float* restrict qh = q + h * DIM;                                                \
    float* restrict s = scratch + h * L;                                                   \
    float m = -3.0e38f;                                                                    \
    for (long j = 0; j < L; j++) {                                                         \
      const float* restrict kj = Kh + j * DIM;                                             \
      float acc = 0.0f;                                                                    \
      _Pragma("omp simd reduction(+ : acc)") for (long d = 0; d < DIM; d++) acc +=         \
          qh[d] * kj[d];                                                                   \
      acc *= scale;                                                                        \
      s[j] = acc;                                                                          \
      m = acc > m ? acc : m;                                                               \
    }                                                                                      \
    float sum = 0.0f;                                                                      \
    _Pragma("omp simd reduction(+ : sum)") for (long j = 0; j < L; j++) {                  \
      float e = exp_nonpos(s[j] - m);                                                      \
      s[j] = e;                                                                            \
      sum += e;                                                                            \
    }                                                                                      \
    const float inv = 1.0f / sum;                                                          \
    float o[DIM];                                                                          \
    for (long d = 0; d < DIM; d++) o[d] = 0.0f;                                            \
    for (long j = 0; j < L; j++) {                                                         \
      const float pj = s[j] * inv;                                                         \
      const float* restrict vj = Vh + j * DIM;                                             \
      _Pragma("omp simd") for (long d = 0; d < DIM; d++) o[d] += pj * vj[d];               \
    }                                                                                      \
    for (long d = 0; d < DIM; d++) out[h * DIM + d] = o[d];                                \
  }

void idealrt_attend_f32(const float* q, const float* K, const float* V, float* out,
                        float* scratch, long heads, long groups, long head_stride, long lo,
                        long end, long D, float scale, int threads) {
  const long L = end - lo;
#pragma omp parallel for num_threads(threads > 1 ? threads : 1) schedule(static)
  for (long h = 0; h < heads; h++) {
    if (D == 64) ATTEND_HEAD(64)
    else if (D == 128) ATTEND_HEAD(128)
    else ATTEND_HEAD(D)
  }
}
