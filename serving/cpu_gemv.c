// A few tokens' products with stored weights (int8 with per-row scales, or bf16) on an x86 CPU with AVX2 and FMA
// (serving/cpu_gemv.py), fp32 activations and sums, for each of the n rows of x:
//     gemv: y[m, o] = sum_k weight[o, k] * x[m, k] (* scale[o] for int8)     weight (rows, cols), x and y fp32
//     mlp:  y = down(silu(gate(x)) * up(x)), gate and up one (2I, H) weight, down (H, I)
// A weight's scales say its type: int8 weights come with them, bf16 ones with NULL. cols, H and I multiples of 32.
// Rows are split over `threads` OpenMP threads: built with -fopenmp, this library binds to the libgomp torch has
// loaded (same soname), so it shares torch's thread pool.
#include <immintrin.h>
#include <math.h>
#include <stddef.h>
#include <stdint.h>

static inline float sum_lanes(__m256 sum) {
    __m128 half = _mm_add_ps(_mm256_castps256_ps128(sum), _mm256_extractf128_ps(sum, 1));
    half = _mm_hadd_ps(half, half);
    half = _mm_hadd_ps(half, half);
    return _mm_cvtss_f32(half);
}

// One row of int8 weights times x: 32 weights a step widened to fp32 into four independent sums (one sum would wait
// on the previous FMA's latency). Meanwhile it asks for `ahead`, a row a few rows on: weights came 5-15% faster
// from memory than with the hardware's prefetching alone.
static inline float dot_int8(const int8_t *row, const int8_t *ahead, const float *x, int64_t cols) {
    __m256 sum0 = _mm256_setzero_ps(), sum1 = _mm256_setzero_ps();
    __m256 sum2 = _mm256_setzero_ps(), sum3 = _mm256_setzero_ps();
    for (int64_t k = 0; k < cols; k += 32) {
        _mm_prefetch((const char *)(ahead + k), _MM_HINT_T0);
        __m256i w = _mm256_loadu_si256((const __m256i *)(row + k));
        __m128i low = _mm256_castsi256_si128(w), high = _mm256_extracti128_si256(w, 1);
        __m256 w0 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(low));
        __m256 w1 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(low, 8)));
        __m256 w2 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(high));
        __m256 w3 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(high, 8)));
        sum0 = _mm256_fmadd_ps(w0, _mm256_loadu_ps(x + k), sum0);
        sum1 = _mm256_fmadd_ps(w1, _mm256_loadu_ps(x + k + 8), sum1);
        sum2 = _mm256_fmadd_ps(w2, _mm256_loadu_ps(x + k + 16), sum2);
        sum3 = _mm256_fmadd_ps(w3, _mm256_loadu_ps(x + k + 24), sum3);
    }
    return sum_lanes(_mm256_add_ps(_mm256_add_ps(sum0, sum1), _mm256_add_ps(sum2, sum3)));
}

// 8 bf16 values as fp32: a bf16 is the upper half of the fp32 with the same bits.
static inline __m256 widen_bf16(const uint16_t *values) {
    __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)values));
    return _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16));
}

// One row of bf16 weights times x, as dot_int8 (32 weights, one 64-byte line, a step).
static inline float dot_bf16(const uint16_t *row, const uint16_t *ahead, const float *x, int64_t cols) {
    __m256 sum0 = _mm256_setzero_ps(), sum1 = _mm256_setzero_ps();
    __m256 sum2 = _mm256_setzero_ps(), sum3 = _mm256_setzero_ps();
    for (int64_t k = 0; k < cols; k += 32) {
        _mm_prefetch((const char *)(ahead + k), _MM_HINT_T0);
        sum0 = _mm256_fmadd_ps(widen_bf16(row + k), _mm256_loadu_ps(x + k), sum0);
        sum1 = _mm256_fmadd_ps(widen_bf16(row + k + 8), _mm256_loadu_ps(x + k + 8), sum1);
        sum2 = _mm256_fmadd_ps(widen_bf16(row + k + 16), _mm256_loadu_ps(x + k + 16), sum2);
        sum3 = _mm256_fmadd_ps(widen_bf16(row + k + 24), _mm256_loadu_ps(x + k + 24), sum3);
    }
    return sum_lanes(_mm256_add_ps(_mm256_add_ps(sum0, sum1), _mm256_add_ps(sum2, sum3)));
}

// Row o of weight (rows, cols) times x: int8 times scale[o], or bf16 where scale is NULL. It prefetches the row 4
// rows on (the last rows ask for themselves).
static inline float dot_row(const void *weight, const float *scale, int64_t o, int64_t rows, int64_t cols,
                            const float *x) {
    int64_t ahead = o + 4 < rows ? o + 4 : o;
    if (scale == NULL)
        return dot_bf16((const uint16_t *)weight + o * cols, (const uint16_t *)weight + ahead * cols, x, cols);
    return dot_int8((const int8_t *)weight + o * cols, (const int8_t *)weight + ahead * cols, x, cols) * scale[o];
}

// 8 weights from index on as fp32.
static inline __m256 widen8(const void *weight, const float *scale, int64_t index) {
    if (scale == NULL)
        return widen_bf16((const uint16_t *)weight + index);
    __m128i w = _mm_loadl_epi64((const __m128i *)((const int8_t *)weight + index));
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(w));
}

// Row o of weight times `count` (1-4) rows of x (x[j * x_stride] on), y[j * y_stride] for row j: each 8 weights
// widened once for the rows, two sums a row (absent rows repeat row 0, their sums unused).
static inline void dot_rows4(const void *weight, const float *scale, int64_t o, int64_t cols, const float *x,
                             int64_t x_stride, int64_t count, float *y, int64_t y_stride) {
    const float *x0 = x, *x1 = x + (count > 1) * x_stride, *x2 = x + (count > 2) * 2 * x_stride;
    const float *x3 = x + (count > 3) * 3 * x_stride;
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps(), a2 = _mm256_setzero_ps(), a3 = _mm256_setzero_ps();
    __m256 b0 = _mm256_setzero_ps(), b1 = _mm256_setzero_ps(), b2 = _mm256_setzero_ps(), b3 = _mm256_setzero_ps();
    for (int64_t k = 0; k < cols; k += 16) {
        __m256 w = widen8(weight, scale, o * cols + k), v = widen8(weight, scale, o * cols + k + 8);
        a0 = _mm256_fmadd_ps(w, _mm256_loadu_ps(x0 + k), a0);
        a1 = _mm256_fmadd_ps(w, _mm256_loadu_ps(x1 + k), a1);
        a2 = _mm256_fmadd_ps(w, _mm256_loadu_ps(x2 + k), a2);
        a3 = _mm256_fmadd_ps(w, _mm256_loadu_ps(x3 + k), a3);
        b0 = _mm256_fmadd_ps(v, _mm256_loadu_ps(x0 + k + 8), b0);
        b1 = _mm256_fmadd_ps(v, _mm256_loadu_ps(x1 + k + 8), b1);
        b2 = _mm256_fmadd_ps(v, _mm256_loadu_ps(x2 + k + 8), b2);
        b3 = _mm256_fmadd_ps(v, _mm256_loadu_ps(x3 + k + 8), b3);
    }
    float sums[4] = {sum_lanes(_mm256_add_ps(a0, b0)), sum_lanes(_mm256_add_ps(a1, b1)),
                     sum_lanes(_mm256_add_ps(a2, b2)), sum_lanes(_mm256_add_ps(a3, b3))};
    float s = scale == NULL ? 1.0f : scale[o];
    for (int64_t j = 0; j < count; j++)
        y[j * y_stride] = sums[j] * s;
}

// Row o of weight (rows, cols) times the n rows of x (row m at x[m * x_stride]) into y[m * y_stride]: one row as
// dot_row (its prefetch), more four at a time while the weight row is in the L1 cache.
static inline void rows_times(const void *weight, const float *scale, int64_t o, int64_t rows, int64_t cols,
                              const float *x, int64_t x_stride, int64_t n, float *y, int64_t y_stride) {
    if (n == 1) {
        y[0] = dot_row(weight, scale, o, rows, cols, x);
        return;
    }
    for (int64_t m = 0; m < n; m += 4)
        dot_rows4(weight, scale, o, cols, x + m * x_stride, x_stride, n - m < 4 ? n - m : 4, y + m * y_stride,
                  y_stride);
}

void cortex_gemv(const float *x, const void *weight, const float *scale, float *y, int64_t n, int64_t rows,
                 int64_t cols, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t o = 0; o < rows; o++)
        rows_times(weight, scale, o, rows, cols, x, cols, n, y + o, rows);
}

// hidden: n x 2I floats of scratch. One parallel region: the threads wait for each other between the three loops.
void cortex_mlp(const float *x, const void *gate_up, const float *gate_up_scale, const void *down,
                const float *down_scale, float *hidden, float *y, int64_t n, int64_t H, int64_t I, int threads) {
#pragma omp parallel num_threads(threads)
    {
#pragma omp for schedule(static)
        for (int64_t o = 0; o < 2 * I; o++)
            rows_times(gate_up, gate_up_scale, o, 2 * I, H, x, H, n, hidden + o, 2 * I);
#pragma omp for schedule(static)
        for (int64_t mi = 0; mi < n * I; mi++) {  // silu(gate) * up, into the first half of each row's 2I
            float *row = hidden + mi / I * 2 * I;
            int64_t i = mi % I;
            row[i] = row[i] / (1.0f + expf(-row[i])) * row[I + i];
        }
#pragma omp for schedule(static)
        for (int64_t o = 0; o < H; o++)
            rows_times(down, down_scale, o, H, I, hidden, 2 * I, n, y + o, H);
    }
}
