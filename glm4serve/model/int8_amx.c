/* int8 weights (and int4 ones, int4_amx_gemm below) times int16 activations on AMX tiles, for batches of rows
 * (int8_kernel.py builds it where the CPU has AMX-INT8; quant.py's Int8Linear weights, unchanged: no repacking, no
 * copy). Prefill chunks' products, on AMX-BF16 tiles: dequantized_tiles.h.
 *
 * y[m, n] = scale[n] * xs[m] * sum_k w[n, k] * xq[m, k], with xq int16 [M, K] and xs as in
 * int8_gemm.c's quantize_rows_int16 (~15 bits per activation). AMX multiplies bytes, so each int16
 * activation is split into a signed high byte and an unsigned low byte, xq = 256 * hi + lo, and
 * both halves go through the tiles (tdpbssd for hi, tdpbsud for lo): twice the products, which the
 * tiles have to spare, for the precision of the int16 kernel.
 *
 * The weight is tile A as it lies ([N, K] row-major: 16 rows x 64 bytes, stride K), so nothing is
 * re-laid out; the activations are tile B, packed per call in the VNNI order AMX wants for B
 * (pack_activations: [M / 16][K / 4][16 rows][4 bytes]). C = 16 weight rows x 16 activation rows.
 * Each program takes 32 weight rows (two A tiles) and every group of 16 activation rows; tiles:
 * 0-3 the sums (2 weight halves x hi/lo), 4-5 weights, 6-7 activations hi/lo.
 * No overflow: |hi * w| <= 128 * 127 and lo * |w| <= 255 * 127, summed over K < 65536 inputs.
 */
#include <omp.h>

#include "amx_tiles.h"

static inline float bf16_to_float(uint16_t b) {
    union { uint32_t u; float f; } v = {(uint32_t)b << 16};
    return v.f;
}

#include "dequantized_tiles.h"  /* prefill chunks: int8 and int4 weights dequantized into bf16 tiles in L2 */

/* Tiles 0-3, the kernels' sums, into memory. */
static inline void store_sums(int32_t sums[4][16][16]) {
    _tile_stored(0, sums[0], 64);
    _tile_stored(1, sums[1], 64);
    _tile_stored(2, sums[2], 64);
    _tile_stored(3, sums[3], 64);
}

/* xq int16 [M, K] -> hi int8, lo uint8, each [ceil(M / 16)][K / 4][16][4] (rows past M zero):
   activation row 16g + i puts its inputs 4k..4k+3 at [g][k][i], 64 bytes after those of 4k - 4. */
void pack_activations(const int16_t *xq, int64_t M, int64_t K, int8_t *hi, uint8_t *lo, int threads) {
    int64_t rows = (M + 15) / 16 * 16;
#pragma omp parallel for schedule(static) num_threads(threads) if (M > 1)
    for (int64_t m = 0; m < rows; m++) {
        int8_t *h = hi + (m / 16) * K * 16 + (m % 16) * 4;
        uint8_t *l = lo + (m / 16) * K * 16 + (m % 16) * 4;
        const int16_t *x = xq + m * K;
        for (int64_t k = 0; k < K; k += 4, h += 64, l += 64)
            for (int t = 0; t < 4; t++) {
                int16_t v = m < M ? x[k + t] : 0;
                h[t] = (int8_t)(v >> 8);
                l[t] = (uint8_t)(v & 0xFF);
            }
    }
}

/* N % 32 == 0, K % 64 == 0; y fp32 [M, N]. */
void int8_amx_gemm(const int8_t *w, const uint16_t *scale, int64_t N, int64_t K, const int8_t *hi,
                   const uint8_t *lo, const float *xs, int64_t M, float *y, int threads) {
    int64_t groups = (M + 15) / 16, group_bytes = K * 16;
#pragma omp parallel num_threads(threads)
    {
        configure_tiles(16);
        int32_t sums[4][16][16];
#pragma omp for schedule(static)
        for (int64_t n0 = 0; n0 < N; n0 += 32) {
            const int8_t *w0 = w + n0 * K, *w1 = w + (n0 + 16) * K;
            for (int64_t g = 0; g < groups; g++) {
                const int8_t *bh = hi + g * group_bytes;
                const uint8_t *bl = lo + g * group_bytes;
                _tile_zero(0);
                _tile_zero(1);
                _tile_zero(2);
                _tile_zero(3);
                for (int64_t k = 0; k < K; k += 64) {
                    _tile_loadd(4, w0 + k, K);
                    _tile_loadd(5, w1 + k, K);
                    _tile_loadd(6, bh + k * 16, 64);
                    _tile_loadd(7, bl + k * 16, 64);
                    _tile_dpbssd(0, 4, 6);
                    _tile_dpbsud(1, 4, 7);
                    _tile_dpbssd(2, 5, 6);
                    _tile_dpbsud(3, 5, 7);
                }
                store_sums(sums);
                int64_t rows = M - g * 16 < 16 ? M - g * 16 : 16;
                for (int half = 0; half < 2; half++) {
                    for (int j = 0; j < 16; j++) {
                        int64_t n = n0 + half * 16 + j;
                        float s = bf16_to_float(scale[n]);
                        for (int64_t i = 0; i < rows; i++) {
                            int64_t m = g * 16 + i;
                            float dot = 256.f * (float)sums[2 * half][j][i] + (float)sums[2 * half + 1][j][i];
                            y[m * N + n] = dot * xs[m] * s;
                        }
                    }
                }
            }
        }
        _tile_release();
    }
}

/* xq int16 [M, K] -> hi int8 and lo uint8, each [ceil(M / 16) * 16][K] row-major (rows past M zero): the
   activations as tile A for int4_amx_gemm, 16 rows x 64 inputs a tile; and gsum fp32 [M][K / 64], the sum
   of each row's inputs in each group of 64. */
void split_activations(const int16_t *xq, int64_t M, int64_t K, int8_t *hi, uint8_t *lo, float *gsum, int threads) {
    int64_t rows = (M + 15) / 16 * 16;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t m = 0; m < rows; m++)
        for (int64_t k0 = 0; k0 < K; k0 += 64) {
            int32_t sum = 0;
            for (int64_t k = k0; k < k0 + 64; k++) {
                int16_t v = m < M ? xq[m * K + k] : 0;
                hi[m * K + k] = (int8_t)(v >> 8);
                lo[m * K + k] = (uint8_t)(v & 0xFF);
                sum += v;
            }
            if (m < M) gsum[m * (K / 64) + k0 / 64] = (float)sum;
        }
}

/* int4 weights (quant.py's Int4Linear, int8_gemm.c's layout: `packed` [N / 64][K][32] bytes, byte j of
 * (tile t, input k) holding row 64t + j in its low nibble and 64t + 32 + j in its high one; `sz` the (scale,
 * zero) bf16 pairs [N / 64][K / 64][64], w = (q - 8) * scale + zero) times int16 activations on AMX tiles,
 * groups of 64 inputs (one tile's depth):
 *   y[m, n] = xs[m] * sum_g (scale * sum_k q * xq + (zero - 8 * scale) * sum_k xq), as int4_gemm.
 * The weights are tile B: AMX wants, for each of 16 rows, 4 consecutive inputs side by side, where the
 * packed layout keeps each input's 64 rows side by side; 4 inputs' bytes are 128 contiguous bytes, so
 * one vpermt2b per 16 rows gathers a tile row from them (the nibbles taken apart first: q in [0, 15] is a
 * signed byte as it is). The activations are tile A (hi signed, lo unsigned, split_activations), C = 16
 * activation rows x 16 weight rows. Each program takes a tile of 64 weight rows; per group it builds the
 * group's 4 B tiles (4 KiB, in L1) once for every activation row, and scales each group's int32 sums into
 * fp32. Tiles: 0-3 the sums (2 weight tiles x hi/lo), 4-5 weights, 6-7 activations hi/lo. No overflow:
 * a group's sums are at most 64 * 15 * 255, and 256 * hi + lo at most 64 * 15 * 32768.
 * N % 64 == 0, K % 64 == 0, M <= INT4_AMX_MAX_ROWS. */
#define INT4_AMX_MAX_ROWS 192
static inline void scale_pair(const uint32_t *pairs, __m512 *scale, __m512 *offset) {
    __m512i p = _mm512_loadu_si512(pairs);
    *scale = _mm512_castsi512_ps(_mm512_slli_epi32(p, 16));
    __m512 zero = _mm512_castsi512_ps(_mm512_and_si512(p, _mm512_set1_epi32((int)0xFFFF0000)));
    *offset = _mm512_fnmadd_ps(_mm512_set1_ps(8.f), *scale, zero);  /* zero - 8 * scale */
}

void int4_amx_gemm(const uint8_t *packed, const uint32_t *sz, int64_t N, int64_t K, const int8_t *hi,
                   const uint8_t *lo, const float *gsum, const float *xs, int64_t M, float *y, int threads) {
    int64_t groups = K / 64, mtiles = (M + 15) / 16;
    if (M > INT4_AMX_MAX_ROWS) return;  /* int8_kernel.py checks first */
    /* byte (input 4i + j, row r) of 128 bytes at 32j + r; a tile row holds rows r0..r0 + 15 x 4 inputs */
    __m512i gather[2];
    {
        uint8_t idx[2][64];
        for (int half = 0; half < 2; half++)
            for (int r = 0; r < 16; r++)
                for (int j = 0; j < 4; j++) idx[half][r * 4 + j] = (uint8_t)(32 * j + 16 * half + r);
        gather[0] = _mm512_loadu_si512(idx[0]);
        gather[1] = _mm512_loadu_si512(idx[1]);
    }
#pragma omp parallel num_threads(threads)
    {
        configure_tiles(M < 16 ? (int)M : 16);
        /* the group's B tiles (rows 16v .. 16v + 15) and sums, two sets, a group's in one while the next's fill the
           other: no group waits for the last one's tiles to be read */
        int8_t bufs[2][4][16][64] __attribute__((aligned(64)));
        int32_t sum_bufs[2][4][16][16] __attribute__((aligned(64)));
        float acc[INT4_AMX_MAX_ROWS][64] __attribute__((aligned(64)));
        const __m512i nibble = _mm512_set1_epi8(0x0F);
#pragma omp for schedule(static)
        for (int64_t t = 0; t < N / 64; t++) {
            memset(acc, 0, sizeof(float) * 64 * M);
            for (int64_t g = 0; g < groups; g++) {
                int8_t (*b)[16][64] = bufs[g & 1];
                int32_t (*sums)[16][16] = sum_bufs[g & 1];
                const uint8_t *p = packed + (t * K + g * 64) * 32;
                for (int i = 0; i < 16; i++, p += 128) {  /* inputs 4i .. 4i + 3 of the group */
                    __m512i b0 = _mm512_loadu_si512(p), b1 = _mm512_loadu_si512(p + 64);
                    __m512i l0 = _mm512_and_si512(b0, nibble), l1 = _mm512_and_si512(b1, nibble);
                    __m512i h0 = _mm512_and_si512(_mm512_srli_epi16(b0, 4), nibble);
                    __m512i h1 = _mm512_and_si512(_mm512_srli_epi16(b1, 4), nibble);
                    _mm512_store_si512(b[0][i], _mm512_permutex2var_epi8(l0, gather[0], l1));
                    _mm512_store_si512(b[1][i], _mm512_permutex2var_epi8(l0, gather[1], l1));
                    _mm512_store_si512(b[2][i], _mm512_permutex2var_epi8(h0, gather[0], h1));
                    _mm512_store_si512(b[3][i], _mm512_permutex2var_epi8(h0, gather[1], h1));
                }
                const uint32_t *pairs = sz + (t * groups + g) * 64;
                for (int half = 0; half < 2; half++) {
                    _tile_loadd(4, b[2 * half], 64);
                    _tile_loadd(5, b[2 * half + 1], 64);
                    __m512 scale[2], offset[2];
                    scale_pair(pairs + 32 * half, &scale[0], &offset[0]);
                    scale_pair(pairs + 32 * half + 16, &scale[1], &offset[1]);
                    for (int64_t mt = 0; mt < mtiles; mt++) {
                        _tile_zero(0);
                        _tile_zero(1);
                        _tile_zero(2);
                        _tile_zero(3);
                        _tile_loadd(6, hi + mt * 16 * K + g * 64, K);
                        _tile_loadd(7, lo + mt * 16 * K + g * 64, K);
                        _tile_dpbssd(0, 6, 4);
                        _tile_dpbusd(1, 7, 4);
                        _tile_dpbssd(2, 6, 5);
                        _tile_dpbusd(3, 7, 5);
                        store_sums(sums);
                        int64_t rows = M - mt * 16 < 16 ? M - mt * 16 : 16;
                        for (int64_t r = 0; r < rows; r++) {
                            int64_t m = mt * 16 + r;
                            __m512 gs = _mm512_set1_ps(gsum[m * groups + g]);
                            for (int v = 0; v < 2; v++) {
                                __m512i d = _mm512_add_epi32(_mm512_slli_epi32(_mm512_load_si512(sums[2 * v][r]), 8),
                                                             _mm512_load_si512(sums[2 * v + 1][r]));
                                float *a = acc[m] + half * 32 + v * 16;
                                __m512 sum = _mm512_fmadd_ps(offset[v], gs, _mm512_load_ps(a));
                                _mm512_store_ps(a, _mm512_fmadd_ps(scale[v], _mm512_cvtepi32_ps(d), sum));
                            }
                        }
                    }
                }
            }
            for (int64_t m = 0; m < M; m++)
                for (int v = 0; v < 4; v++)
                    _mm512_storeu_ps(y + m * N + t * 64 + v * 16,
                                     _mm512_mul_ps(_mm512_load_ps(acc[m] + v * 16), _mm512_set1_ps(xs[m])));
        }
        _tile_release();
    }
}
