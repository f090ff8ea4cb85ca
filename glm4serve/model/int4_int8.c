/* int4 weights times int8 activations, for quant.py's Int4Linear batches on CPUs without AMX: built by int8_kernel.py
 * as int8_gemm.c is, for AVX-512 VNNI with or without VBMI or, with other flags, for AVX2 and FMA (the same numbers,
 * bit for bit).
 *
 * There int8_gemm.c's int4_gemm (quant_avx2.c's on AVX2) is bound by its multiplies from ~4 activation rows on:
 * vpdpwssd takes 32 int16 products an instruction, so each row costs a glm-4-9b step ~45 ms of 2 cores however the
 * weights are unpacked. vpdpbusd takes 64 (unsigned 8-bit weights, signed 8-bit activations), and the int4 weights
 * are 4-bit unsigned already: activations quantized to int8 in groups of the weights' group (a scale each, as
 * llama.cpp's Q8_0 activations, 32 inputs each there) halve the multiplies. The price: the activations keep ~8 bits
 * instead of ~15, an error well below the int4 weights' own (BENCHMARKS.md).
 *
 * y[m, n] = sum over groups g of xs[m, g] * (scale[n, g] * sum_k q[n, k] * xq[m, k]
 *                                          + (zero[n, g] - 8 * scale[n, g]) * sum_k xq[m, k]), k in the group
 *   q     the int4 weights in torch's CPU layout, [N / 64][K][32] bytes, byte j of (tile t, input k) holding row
 *         64t + j in its low nibble and row 64t + 32 + j in its high one; `sz` the (scale, zero) bf16 pairs tile
 *         by tile, [N / 64][K / group][64], w = (q - 8) * scale + zero (int8_gemm.c's int4_gemm reads the same);
 *   xq    int8, x / xs rounded, xs = max|x| / 127 over each row's group of inputs.
 *
 * Four inputs of a tile's 64 rows are 128 contiguous bytes. Unpacked, row r's four weights are bytes 4r..4r+3 of a
 * 256-byte block, a 32-bit lane each as vpdpbusd wants them (two vpermt2b per 32 rows with VBMI; byte and word
 * unpacks, 256 bits wide, without it). Each group is unpacked once into an L1 buffer that every activation row then
 * reads. AVX2 has no vpdpbusd: vpmaddubsw makes the pairs' int16 sums (at most 2 * 15 * 127), 8 of them are added
 * in int16 (below 2^15), then vpmaddwd by ones and an add take them to int32. Where AVX2 alone runs, this build
 * takes every int4 product, one activation row too (quant_avx2.c's int4_gemm, int16 activations, is bound there by
 * its vpmaddwd). A single row reads the packed weights in place (direct_sums), not through the buffer, whose
 * unpacking would cost it more than its multiplies.
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define MAX_GROUP 64  /* quant.py's INT4_GROUP: a group's unpacked weights fill a 4 KiB buffer */
#define QUAD 256      /* bytes of 4 unpacked inputs of a tile's 64 rows */
#define PREFETCH_L1 2048  /* as int8_gemm.c's int4_gemm: the stream asked for into L1, and further into L2 */
#define PREFETCH_L2 8192

/* Every build scales an activation row's group sums into its 64 outputs (fp32, running over the groups; zeros before
   the first) in the same fused steps: out = fma(fma(scale, sum, (zero - 8 * scale) * xsum), xs, out). */

#if defined(__AVX512VBMI__)
/* Inputs k..k+3 of a tile's 64 rows (128 bytes from p) -> QUAD bytes at `quad`, row r's 4 weights at 4r. */
static inline void unpack4(const uint8_t *p, uint8_t *quad) {
    const __m512i nibble = _mm512_set1_epi8(0x0F);
    /* byte 4r + i of the result is input i of row r: input 0 is byte r of a, 1 byte 32 + r, 2 byte r of b, 3 32 + r */
    const __m512i first = _mm512_set_epi32(
        0x6F4F2F0F, 0x6E4E2E0E, 0x6D4D2D0D, 0x6C4C2C0C, 0x6B4B2B0B, 0x6A4A2A0A, 0x69492909, 0x68482808,
        0x67472707, 0x66462606, 0x65452505, 0x64442404, 0x63432303, 0x62422202, 0x61412101, 0x60402000);
    const __m512i second = _mm512_add_epi8(first, _mm512_set1_epi8(16));  /* rows 16-31 */
    __m512i a = _mm512_loadu_si512(p), b = _mm512_loadu_si512(p + 64);
    __m512i alo = _mm512_and_si512(a, nibble), blo = _mm512_and_si512(b, nibble);
    __m512i ahi = _mm512_and_si512(_mm512_srli_epi16(a, 4), nibble);
    __m512i bhi = _mm512_and_si512(_mm512_srli_epi16(b, 4), nibble);
    __m512i *w = (__m512i *)quad;
    _mm512_store_si512(w, _mm512_permutex2var_epi8(alo, first, blo));
    _mm512_store_si512(w + 1, _mm512_permutex2var_epi8(alo, second, blo));
    _mm512_store_si512(w + 2, _mm512_permutex2var_epi8(ahi, first, bhi));
    _mm512_store_si512(w + 3, _mm512_permutex2var_epi8(ahi, second, bhi));
}

#else  /* AVX2, or AVX-512 without VBMI */

/* unpack4 as above, in 12 shuffles per 32 rows against VBMI's 2: the byte and word unpacks leave rows {0-3, 16-19},
   {4-7, 20-23}, ... per 128-bit lane, and the lane moves put them in order */
static inline void unpack4(const uint8_t *p, uint8_t *quad) {
    const __m256i nibble = _mm256_set1_epi8(0x0F);
    __m256i *w = (__m256i *)quad;
    for (int half = 0; half < 2; half++) {  /* the low nibbles: rows 0-31; the high ones: rows 32-63 */
        __m256i b[4];
        for (int i = 0; i < 4; i++) {
            __m256i bytes = _mm256_loadu_si256((const __m256i *)(p + 32 * i));
            b[i] = _mm256_and_si256(half ? _mm256_srli_epi16(bytes, 4) : bytes, nibble);
        }
        __m256i lo01 = _mm256_unpacklo_epi8(b[0], b[1]), hi01 = _mm256_unpackhi_epi8(b[0], b[1]);
        __m256i lo23 = _mm256_unpacklo_epi8(b[2], b[3]), hi23 = _mm256_unpackhi_epi8(b[2], b[3]);
        /* rows 0-3 | 16-19, 4-7 | 20-23, 8-11 | 24-27, 12-15 | 28-31 */
        __m256i q0 = _mm256_unpacklo_epi16(lo01, lo23), q1 = _mm256_unpackhi_epi16(lo01, lo23);
        __m256i q2 = _mm256_unpacklo_epi16(hi01, hi23), q3 = _mm256_unpackhi_epi16(hi01, hi23);
        _mm256_store_si256(w + 4 * half, _mm256_permute2x128_si256(q0, q1, 0x20));
        _mm256_store_si256(w + 4 * half + 1, _mm256_permute2x128_si256(q2, q3, 0x20));
        _mm256_store_si256(w + 4 * half + 2, _mm256_permute2x128_si256(q0, q1, 0x31));
        _mm256_store_si256(w + 4 * half + 3, _mm256_permute2x128_si256(q2, q3, 0x31));
    }
}

#endif

#if defined(__AVX512VNNI__)  /* with or without VBMI */
#define ROWS 4  /* activation rows summed together against one read of the buffer */

/* x [M, K] fp32 -> xq [K / group][M][group] int8 (each row's group contiguous: see int4_int8_gemm), xs and the sum
   of each group's integers, [M][K / group]. group: a multiple of 16. */
static void quantize_groups(const float *x, int64_t M, int64_t K, int64_t group, int8_t *xq, float *xs,
                            float *xsum, int threads) {
    int64_t groups = K / group;
#pragma omp parallel for schedule(static) num_threads(threads) if (M * K > 65536)
    for (int64_t mg = 0; mg < M * groups; mg++) {
        int64_t m = mg / groups, g = mg % groups;
        const float *xr = x + m * K + g * group;
        __m512 amax = _mm512_setzero_ps();
        for (int64_t k = 0; k < group; k += 16) amax = _mm512_max_ps(amax, _mm512_abs_ps(_mm512_loadu_ps(xr + k)));
        float top = _mm512_reduce_max_ps(amax);
        __m512 inv = _mm512_set1_ps(top > 0.f ? 127.f / top : 0.f);
        __m512i sum = _mm512_setzero_si512();
        int8_t *out = xq + (g * M + m) * group;
        for (int64_t k = 0; k < group; k += 16) {
            __m512i q = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(xr + k), inv));  /* to nearest, even */
            sum = _mm512_add_epi32(sum, q);
            _mm_storeu_si128((__m128i *)(out + k), _mm512_cvtepi32_epi8(q));
        }
        xs[mg] = top / 127.f;
        xsum[mg] = (float)_mm512_reduce_add_epi32(sum);
    }
}

/* One group of `rows` (1..ROWS, a constant where inlined) activation rows against the unpacked buffer, scaled into
   out[m * 64 ..]. x: the rows' inputs of the group, `group` apart; xs, xsum: the rows' values for this group,
   `groups` apart. */
static inline __attribute__((always_inline)) void group_rows(const uint8_t *buffer, int64_t group, const int8_t *x,
                                                             const uint32_t *pairs, const float *xs,
                                                             const float *xsum, int64_t groups, int rows, int first,
                                                             float *out) {
    __m512i acc[ROWS][4];
    for (int m = 0; m < rows; m++)
        for (int v = 0; v < 4; v++) acc[m][v] = _mm512_setzero_si512();
    for (int64_t k = 0; k < group; k += 4) {
        const __m512i *w = (const __m512i *)(buffer + k / 4 * QUAD);
        for (int m = 0; m < rows; m++) {
            __m512i quad = _mm512_set1_epi32(*(const int32_t *)(x + m * group + k));
            for (int v = 0; v < 4; v++) acc[m][v] = _mm512_dpbusd_epi32(acc[m][v], _mm512_load_si512(w + v), quad);
        }
    }
    for (int v = 0; v < 4; v++) {
        __m512i p = _mm512_loadu_si512(pairs + v * 16);
        __m512 scale = _mm512_castsi512_ps(_mm512_slli_epi32(p, 16));
        __m512 zero = _mm512_castsi512_ps(_mm512_and_si512(p, _mm512_set1_epi32((int)0xFFFF0000)));
        __m512 offset = _mm512_fnmadd_ps(_mm512_set1_ps(8.f), scale, zero);  /* zero - 8 * scale */
        for (int m = 0; m < rows; m++) {
            float *o = out + m * 64 + v * 16;
            __m512 dot = _mm512_fmadd_ps(scale, _mm512_cvtepi32_ps(acc[m][v]),
                                         _mm512_mul_ps(offset, _mm512_set1_ps(xsum[m * groups])));
            _mm512_storeu_ps(o, _mm512_fmadd_ps(dot, _mm512_set1_ps(xs[m * groups]),
                                                first ? _mm512_setzero_ps() : _mm512_loadu_ps(o)));
        }
    }
}

/* group_rows for all M activation rows, ROWS at a time */
static void group_all_rows(const uint8_t *buffer, int64_t group, const int8_t *x, const uint32_t *pairs,
                           const float *xs, const float *xsum, int64_t groups, int64_t M, int first, float *out) {
    for (int64_t m0 = 0; m0 < M; m0 += ROWS) {
        const int8_t *xm = x + m0 * group;
        const float *s = xs + m0 * groups, *t = xsum + m0 * groups;
        float *o = out + m0 * 64;
        switch (M - m0 < ROWS ? M - m0 : ROWS) {
            case 1: group_rows(buffer, group, xm, pairs, s, t, groups, 1, first, o); break;
            case 2: group_rows(buffer, group, xm, pairs, s, t, groups, 2, first, o); break;
            case 3: group_rows(buffer, group, xm, pairs, s, t, groups, 3, first, o); break;
            default: group_rows(buffer, group, xm, pairs, s, t, groups, 4, first, o); break;
        }
    }
}

#else  /* AVX2 and FMA */

/* quantize_groups as above, 8 lanes: the same numbers */
static void quantize_groups(const float *x, int64_t M, int64_t K, int64_t group, int8_t *xq, float *xs,
                            float *xsum, int threads) {
    int64_t groups = K / group;
    const __m256 magnitude = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
#pragma omp parallel for schedule(static) num_threads(threads) if (M * K > 65536)
    for (int64_t mg = 0; mg < M * groups; mg++) {
        int64_t m = mg / groups, g = mg % groups;
        const float *xr = x + m * K + g * group;
        __m256 amax = _mm256_setzero_ps();
        for (int64_t k = 0; k < group; k += 8)
            amax = _mm256_max_ps(amax, _mm256_and_ps(_mm256_loadu_ps(xr + k), magnitude));
        __m128 h = _mm_max_ps(_mm256_castps256_ps128(amax), _mm256_extractf128_ps(amax, 1));
        h = _mm_max_ps(h, _mm_movehl_ps(h, h));
        float top = _mm_cvtss_f32(_mm_max_ss(h, _mm_movehdup_ps(h)));
        __m256 inv = _mm256_set1_ps(top > 0.f ? 127.f / top : 0.f);
        int32_t sum = 0, q[8];
        int8_t *out = xq + (g * M + m) * group;
        for (int64_t k = 0; k < group; k += 8) {
            _mm256_storeu_si256((__m256i *)q, _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(xr + k), inv)));
            for (int i = 0; i < 8; i++) {
                sum += q[i];
                out[k + i] = (int8_t)q[i];
            }
        }
        xs[mg] = top / 127.f;
        xsum[mg] = (float)sum;
    }
}

/* acc += x in int16 lanes, acc kept in its register. Written as an intrinsic in a loop that carries the sums, GCC 12
   made each sum in a new register and copied it back (vmovdqa) every step: 8 of a quad's 36 instructions in
   group_row, whose batches ran 1.06-1.13x slower for it. */
static inline __attribute__((always_inline)) void add16_into(__m256i *acc, __m256i x) {
    __asm__("vpaddw %1, %0, %0" : "+x"(*acc) : "x"(x));
}

/* A group's int32 sums of one activation row (8 vectors of 8 weight rows, in row order) scaled into out[0..63] */
static inline void scale_row(const __m256i acc[8], const uint32_t *pairs, float xs, float xsum, int first,
                             float *out) {
    for (int v = 0; v < 8; v++) {
        __m256i p = _mm256_loadu_si256((const __m256i *)(pairs + v * 8));
        __m256 scale = _mm256_castsi256_ps(_mm256_slli_epi32(p, 16));
        __m256 zero = _mm256_castsi256_ps(_mm256_and_si256(p, _mm256_set1_epi32((int)0xFFFF0000)));
        __m256 offset = _mm256_fnmadd_ps(_mm256_set1_ps(8.f), scale, zero);
        __m256 dot = _mm256_fmadd_ps(scale, _mm256_cvtepi32_ps(acc[v]), _mm256_mul_ps(offset, _mm256_set1_ps(xsum)));
        _mm256_storeu_ps(out + v * 8, _mm256_fmadd_ps(dot, _mm256_set1_ps(xs),
                                                      first ? _mm256_setzero_ps() : _mm256_loadu_ps(out + v * 8)));
    }
}

/* One activation row's group against the buffer, scaled into out[0..63]: 8 quads at a time summed in int16 (8 vectors
   of 8 weight rows), then added into int32 */
static void group_row(const uint8_t *buffer, int64_t group, const int8_t *x, const uint32_t *pairs, float xs,
                      float xsum, int first, float *out) {
    const __m256i ones = _mm256_set1_epi16(1);
    __m256i acc[8];
    for (int v = 0; v < 8; v++) acc[v] = _mm256_setzero_si256();
    for (int64_t k0 = 0; k0 < group; k0 += 32) {
        __m256i sums[8];
        for (int v = 0; v < 8; v++) sums[v] = _mm256_setzero_si256();
        for (int j = 0; j < 8; j++) {
            const __m256i *w = (const __m256i *)(buffer + (k0 / 4 + j) * QUAD);
            __m256i quad = _mm256_set1_epi32(*(const int32_t *)(x + k0 + 4 * j));
            for (int v = 0; v < 8; v++) add16_into(sums + v, _mm256_maddubs_epi16(_mm256_load_si256(w + v), quad));
        }
        for (int v = 0; v < 8; v++) acc[v] = _mm256_add_epi32(acc[v], _mm256_madd_epi16(sums[v], ones));
    }
    scale_row(acc, pairs, xs, xsum, first, out);
}

static void group_all_rows(const uint8_t *buffer, int64_t group, const int8_t *x, const uint32_t *pairs,
                           const float *xs, const float *xsum, int64_t groups, int64_t M, int first, float *out) {
    for (int64_t m = 0; m < M; m++)
        group_row(buffer, group, x + m * group, pairs, xs[m * groups], xsum[m * groups], first, out + m * 64);
}

/* A group's int16 sums over 16 inputs (nibble_pairs' order) added into a row's int32 sums in row order: s0 holds
   rows 0-7 | 16-23 (its two 128-bit lanes), s1 rows 8-15 | 24-31, s2 and s3 the same 32 rows on */
static inline void widen_into(__m256i acc[8], __m256i s0, __m256i s1, __m256i s2, __m256i s3) {
    __m256i s[4] = {s0, s1, s2, s3};
    for (int i = 0; i < 4; i++) {
        int v = (i & 1) + (i >> 1) * 4;  /* the vector of the low lane's rows; the high lane's are 2 on */
        acc[v] = _mm256_add_epi32(acc[v], _mm256_cvtepi16_epi32(_mm256_castsi256_si128(s[i])));
        acc[v + 2] = _mm256_add_epi32(acc[v + 2], _mm256_cvtepi16_epi32(_mm256_extracti128_si256(s[i], 1)));
    }
}

/* Inputs k and k + 1 of a tile's 64 rows (64 bytes from p) -> w[0..3]: each weight row's pair of nibbles side by
   side, as vpmaddubsw wants them (rows in widen_into's order) */
static inline __attribute__((always_inline)) void nibble_pairs(const uint8_t *p, __m256i w[4]) {
    const __m256i nibble = _mm256_set1_epi8(0x0F);
    __m256i b0 = _mm256_loadu_si256((const __m256i *)p), b1 = _mm256_loadu_si256((const __m256i *)(p + 32));
    __m256i lo = _mm256_unpacklo_epi8(b0, b1), hi = _mm256_unpackhi_epi8(b0, b1);
    w[0] = _mm256_and_si256(lo, nibble);
    w[1] = _mm256_and_si256(hi, nibble);
    w[2] = _mm256_and_si256(_mm256_srli_epi16(lo, 4), nibble);
    w[3] = _mm256_and_si256(_mm256_srli_epi16(hi, 4), nibble);
}

/* A group's int32 sums of one activation row read from the packed weights in place (p: the group's first input),
   with no unpacked buffer. Interleaving the bytes of inputs k and k + 1 puts each weight row's two nibbles side by
   side (nibble_pairs: 10 instructions for 128 weights, loads included, where unpack4 takes 26 with its stores and
   a row's reads of the buffer 4 more), and sign-extending the int16 sums lands them in row order. 8 pairs of int16
   products (at most 2 * 15 * 127 each) are summed before that, below 2^15. The int16 sums are named variables: as
   an array, GCC kept them on the stack. */
static __attribute__((noinline)) void direct_sums(const uint8_t *p, const int8_t *x, int64_t group, __m256i acc[8]) {
    for (int v = 0; v < 8; v++) acc[v] = _mm256_setzero_si256();
    for (int64_t k0 = 0; k0 < group; k0 += 16) {
        __m256i s0 = _mm256_setzero_si256(), s1 = s0, s2 = s0, s3 = s0;
        for (int64_t k = k0; k < k0 + 16; k += 2, p += 64) {
            _mm_prefetch((const char *)(p + PREFETCH_L1), _MM_HINT_T0);
            _mm_prefetch((const char *)(p + PREFETCH_L2), _MM_HINT_T1);
            __m256i w[4], pair = _mm256_set1_epi16(*(const int16_t *)(x + k));
            nibble_pairs(p, w);
            add16_into(&s0, _mm256_maddubs_epi16(w[0], pair));
            add16_into(&s1, _mm256_maddubs_epi16(w[1], pair));
            add16_into(&s2, _mm256_maddubs_epi16(w[2], pair));
            add16_into(&s3, _mm256_maddubs_epi16(w[3], pair));
        }
        widen_into(acc, s0, s1, s2, s3);
    }
}

#endif

/* y [M, N] fp32 = x [M, K] fp32 @ W.T, W in the int4 layout above. Each program takes a tile of 64 rows, unpacks
   each of its groups once and runs every activation row against it; the activations are first laid out group by
   group and each tile's sums kept in a buffer of its own, both contiguous (rows of K or N elements, powers of two
   at glm-4-9b's 4096, would fall into the same few cache sets: quant_avx2.c's int4_gemm). group: 32 or MAX_GROUP;
   K a multiple of the group, N of 64. */
void int4_int8_gemm(const uint8_t *packed, const uint32_t *sz, int64_t N, int64_t K, int64_t group, const float *x,
                    int64_t M, float *y, int threads) {
    int64_t groups = K / group;
    int8_t *xq = malloc(M * K);
    float *xs = malloc(sizeof(float) * M * groups), *xsum = malloc(sizeof(float) * M * groups);
    quantize_groups(x, M, K, group, xq, xs, xsum, threads);
#pragma omp parallel num_threads(threads)
    {
        uint8_t buffer[MAX_GROUP / 4 * QUAD] __attribute__((aligned(64)));
        float *out = aligned_alloc(64, sizeof(float) * 64 * M);  /* the tile's sums, [M][64] */
#pragma omp for schedule(static)
        for (int64_t tile = 0; tile < N / 64; tile++) {
            const uint8_t *p = packed + tile * K * 32;
            const uint32_t *pairs = sz + tile * groups * 64;
            for (int64_t g = 0; g < groups; g++) {
#if !defined(__AVX512VNNI__)
                if (M == 1) {  /* AVX2: the packed weights read in place, unbuffered */
                    __m256i acc[8];
                    direct_sums(p + g * group * 32, xq + g * group, group, acc);
                    scale_row(acc, pairs + g * 64, xs[g], xsum[g], g == 0, out);
                    continue;
                }
#endif
                for (int64_t k = 0; k < group; k += 4) {
                    int64_t at = (g * group + k) * 32;
                    _mm_prefetch((const char *)(p + at + PREFETCH_L1), _MM_HINT_T0);
                    _mm_prefetch((const char *)(p + at + PREFETCH_L1 + 64), _MM_HINT_T0);
                    _mm_prefetch((const char *)(p + at + PREFETCH_L2), _MM_HINT_T1);
                    _mm_prefetch((const char *)(p + at + PREFETCH_L2 + 64), _MM_HINT_T1);
                    unpack4(p + at, buffer + k / 4 * QUAD);
                }
                group_all_rows(buffer, group, xq + g * M * group, pairs + g * 64, xs + g, xsum + g, groups, M,
                               g == 0, out);
            }
            for (int64_t m = 0; m < M; m++) memcpy(y + m * N + tile * 64, out + m * 64, sizeof(float) * 64);
        }
        free(out);
    }
    free(xsum);
    free(xs);
    free(xq);
}
