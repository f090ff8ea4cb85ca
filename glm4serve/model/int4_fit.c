/* The scale and minimum of each int4 group (quant.py's Int4Linear), fitted to the least squared error rather than
 * spread over the group's range: w ~ q * scale + min, q in 0..15. For each candidate spread of the range over
 * 11 to 15.5 levels the codes are the nearest ones, and for those codes the scale and minimum are the least-squares
 * solution; the candidate of the smallest squared error wins (llama.cpp fits Q4_K's sub-blocks so). The error is
 * had from the sums alone: sum (q s + m - w)^2 = s^2 Sqq + 2 s m Sq - 2 s Sqw + g m^2 - 2 m Sw + Sww, the last term
 * the same for every candidate. Where this does not build, quant.int4_fit spreads the levels over the range.
 * Built by int8_kernel.py with `-mavx2 -mfma`: 8 weights a vector, g a multiple of 8 (Int4Linear's 32 or 64).
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>

static inline float sum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

static inline float min8(__m256 v) {
    __m128 s = _mm_min_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_min_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_min_ss(s, _mm_movehdup_ps(s)));
}

static inline float max8(__m256 v) {
    __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_max_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_max_ss(s, _mm_movehdup_ps(s)));
}

void int4_fit(const float *w, int64_t groups, int64_t g, const float *spreads, int64_t n_spreads,
              float *scale_out, float *min_out, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t i = 0; i < groups; i++) {
        const float *v = w + i * g;
        __m256 vlo = _mm256_loadu_ps(v), vhi = vlo, vsw = vlo;
        for (int64_t j = 8; j < g; j += 8) {
            __m256 x = _mm256_loadu_ps(v + j);
            vlo = _mm256_min_ps(vlo, x);
            vhi = _mm256_max_ps(vhi, x);
            vsw = _mm256_add_ps(vsw, x);
        }
        float lo = min8(vlo), range = fmaxf(max8(vhi) - lo, 1e-12f);
        double sw = sum8(vsw), n = (double)g;
        double best = INFINITY, best_scale = range / 15.0, best_min = lo;
        const __m256 low = _mm256_set1_ps(lo), none = _mm256_setzero_ps(), most = _mm256_set1_ps(15.0f);
        for (int64_t c = 0; c < n_spreads; c++) {
            const __m256 inverse = _mm256_set1_ps(spreads[c] / range);
            __m256 sq = _mm256_setzero_ps(), sqq = sq, sqw = sq;
            for (int64_t j = 0; j < g; j += 8) {
                __m256 x = _mm256_loadu_ps(v + j);
                __m256 q = _mm256_round_ps(_mm256_mul_ps(_mm256_sub_ps(x, low), inverse),
                                           _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
                q = _mm256_min_ps(_mm256_max_ps(q, none), most);
                sq = _mm256_add_ps(sq, q);
                sqq = _mm256_fmadd_ps(q, q, sqq);
                sqw = _mm256_fmadd_ps(q, x, sqw);
            }
            /* in double: the error is a difference of terms far larger than it */
            double s_q = sum8(sq), s_qq = sum8(sqq), s_qw = sum8(sqw), det = n * s_qq - s_q * s_q;
            double scale = det > 0.0 ? (n * s_qw - s_q * sw) / det : range / 15.0;
            double m = (sw - scale * s_q) / n;
            double err = scale * scale * s_qq + 2.0 * scale * m * s_q - 2.0 * scale * s_qw + n * m * m - 2.0 * m * sw;
            if (err < best) {
                best = err;
                best_scale = scale;
                best_min = m;
            }
        }
        scale_out[i] = (float)best_scale;
        min_out[i] = (float)best_min;
    }
}
