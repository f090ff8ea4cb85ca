/* Part of int8_amx.c (its one translation unit, after bf16_to_float): the prefill chunks' products on AMX-BF16
 * tiles, the quantized weight dequantized a block of rows at a time into bf16 tiles that stay in the thread's L2. */
#ifndef GLM4SERVE_DEQUANTIZED_TILES_H
#define GLM4SERVE_DEQUANTIZED_TILES_H
#include <omp.h>

#include "amx_tiles.h"

/* int8 weights times bf16 activations, for prefill chunks (int8_kernel.tiles_fit: AMX_MAX_ROWS rows and more).
 * There int8_amx.c's products (twice the tile products, for int16 activations) fall behind a bf16 product, which
 * needed the weight dequantized to bf16 in memory first (int8_kernel.blockwise_matmul), a pass of 3 bytes a weight
 * through memory at every chunk. Here each thread dequantizes TILES_ROWS weight rows at a time into tiles A
 * (16 rows x 32 inputs, 1 KiB, contiguous) in its own buffer, 1 MiB for 4,096 inputs, which stays in its L2 while
 * every activation row is multiplied with it: tiles 0-3 the sums (2 weight halves x 2 groups of 16 activation
 * rows), 4-5 the weights, 6-7 the activations (bf16 pairs, tile B: pack_bf16_pairs). The sums in fp32, rounded
 * to bf16 once, as oneDNN's bf16 product has them. int8_kernel.TILES_MAX_INPUTS bounds K, so that the block
 * stays in L2. */
#define TILES_ROWS 128
#define TILES_ISA "amx-tile,amx-bf16,avx512f,avx512bw,avx512bf16"

/* x bf16 [M, K] -> [2 * ceil(M / 32)][K / 2][16] pairs of inputs, rows past M zero (an even number of groups of
   16 rows, taken two at a time): row 16g + i's inputs 2p, 2p + 1 at [g][p][i]. K % 32 == 0. */
__attribute__((target("avx512f"))) void pack_bf16_pairs(const uint32_t *x, int64_t M, int64_t K, uint32_t *out,
                                                        int threads) {
    const int64_t pairs = K / 2, groups = (M + 31) / 32 * 2;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t g = 0; g < groups; g++)
        for (int64_t p = 0; p < pairs; p += 16) {
            __m512i r[16];
            for (int i = 0; i < 16; i++)
                r[i] = g * 16 + i < M ? _mm512_loadu_si512(x + (g * 16 + i) * pairs + p) : _mm512_setzero_si512();
            transpose16_dwords(r);
            for (int i = 0; i < 16; i++) _mm512_storeu_si512(out + (g * pairs + p + i) * 16, r[i]);
        }
}

/* Weight rows [n0, n0 + rows) dequantized (w * scale, rounded to bf16) into tiles A: [rows / 16][K / 32][16][32]. */
static inline __attribute__((target(TILES_ISA))) void dequantize_tiles(const int8_t *w, const uint16_t *scale,
                                                                       int64_t K, int64_t n0, int64_t rows,
                                                                       uint16_t *tiles) {
    for (int64_t r = 0; r < rows; r++) {
        const __m512 s = _mm512_set1_ps(bf16_to_float(scale[n0 + r]));
        const int8_t *row = w + (n0 + r) * K;
        uint16_t *out = tiles + (r / 16 * (K / 32) * 16 + r % 16) * 32;
        for (int64_t k = 0; k < K; k += 32, out += 512) {
            const __m256i q = _mm256_loadu_si256((const void *)(row + k));
            const __m512 lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_castsi256_si128(q)));
            const __m512 hi = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_extracti128_si256(q, 1)));
            _mm512_storeu_si512(out, (__m512i)_mm512_cvtne2ps_pbh(_mm512_mul_ps(hi, s), _mm512_mul_ps(lo, s)));
        }
    }
}

/* Tile t's sums ([16 weight rows][16 activation rows], fp32, in memory) -> y's rows [m, m + rows), 16 columns. */
static inline __attribute__((target(TILES_ISA))) void store_transposed(const float *sums, uint16_t *y, int64_t N,
                                                                       int64_t rows) {
    __m512i r[16];
    for (int i = 0; i < 16; i++) r[i] = _mm512_loadu_si512(sums + 16 * i);
    transpose16_dwords(r);
    for (int64_t i = 0; i < rows; i++)
        _mm256_storeu_si256((void *)(y + i * N), (__m256i)_mm512_cvtneps_pbh(_mm512_castsi512_ps(r[i])));
}

/* The weight rows a thread dequantizes at a time: its buffer holds that many times K. */
int int8_tiles_rows(void) { return TILES_ROWS; }

/* y bf16 [M, N] = x @ (w * scale).T, xp = pack_bf16_pairs(x); N % 32 == 0, K % 32 == 0;
   tiles: a bf16 buffer of threads * TILES_ROWS * K. Each thread takes its share of the weight's rows, 32 at a time. */
__attribute__((target(TILES_ISA))) void int8_tiles_gemm(const int8_t *w, const uint16_t *scale, int64_t N, int64_t K,
                                                        const uint32_t *xp, int64_t M, uint16_t *y, uint16_t *tiles,
                                                        int threads) {
    const int64_t steps = K / 32, group = K / 2 * 16, pairs_of_groups = (M + 31) / 32;
#pragma omp parallel num_threads(threads)
    {
        configure_tiles(16);
        const int t = omp_get_thread_num(), nt = omp_get_num_threads();
        const int64_t first = N / 32 * t / nt * 32, last = N / 32 * (t + 1) / nt * 32;
        uint16_t *own = tiles + (int64_t)t * TILES_ROWS * K;
        float sums[4][256] __attribute__((aligned(64)));
        for (int64_t n0 = first; n0 < last; n0 += TILES_ROWS) {
            const int64_t rows = last - n0 < TILES_ROWS ? last - n0 : TILES_ROWS;
            dequantize_tiles(w, scale, K, n0, rows, own);
            for (int64_t p = 0; p < pairs_of_groups; p++) {
                const uint32_t *b0 = xp + 2 * p * group, *b1 = b0 + group;
                for (int64_t j = 0; j < rows / 32; j++) {
                    const uint16_t *a0 = own + 2 * j * steps * 512, *a1 = a0 + steps * 512;
                    _tile_zero(0);
                    _tile_zero(1);
                    _tile_zero(2);
                    _tile_zero(3);
                    for (int64_t s = 0; s < steps; s++) {
                        _tile_loadd(4, a0 + s * 512, 64);
                        _tile_loadd(6, b0 + s * 256, 64);
                        _tile_dpbf16ps(0, 4, 6);
                        _tile_loadd(5, a1 + s * 512, 64);
                        _tile_dpbf16ps(1, 5, 6);
                        _tile_loadd(7, b1 + s * 256, 64);
                        _tile_dpbf16ps(2, 4, 7);
                        _tile_dpbf16ps(3, 5, 7);
                    }
                    _tile_stored(0, sums[0], 64);
                    _tile_stored(1, sums[1], 64);
                    _tile_stored(2, sums[2], 64);
                    _tile_stored(3, sums[3], 64);
                    for (int q = 0; q < 4; q++) {  /* tile q: weight half q % 2, activation group q / 2 */
                        const int64_t m = 32 * p + 16 * (q / 2), left = M - m < 16 ? M - m : 16;
                        if (left > 0) store_transposed(sums[q], y + m * N + n0 + 32 * j + 16 * (q % 2), N, left);
                    }
                }
            }
        }
        _tile_release();
    }
}

/* int4 weights (quant.py's Int4Linear, as int8_gemm.c's dequantize_int4_bf16 reads them: packed [N / 64][K][32]
 * bytes, byte j of (tile t, input k) holding row 64t + j in its low nibble and 64t + 32 + j in its high one; the
 * (scale, zero) pairs [N / 64][K / group][64]) times bf16 activations. Here the weight is tile B, whose rows hold
 * 2 consecutive inputs of 16 weight rows: the packed layout keeps each input's 64 rows side by side, so the 64
 * bytes of two inputs give four B rows with no transpose. The activations are tiles A as they lie in x (16 rows x
 * 32 inputs, a row every K inputs), and the sums come out [activation rows][weight rows], as y wants them: neither
 * side is re-laid out. Tiles 0-3 the sums (2 groups of 16 activation rows x 2 of 16 weight rows), 4-5 the
 * activations, 6-7 the weights. Each thread dequantizes INT4_TILES_PACKS pack tiles at a time, and of more than
 * INT4_TILES_CHUNK inputs (glm-4-9b's down projection, 13,696) a chunk of whole groups at a time, its sums kept in
 * fp32 between chunks: the block stays in L2, and the activations are read once per block of rows whatever K. */
#define INT4_TILES_PACKS 2     /* 128 weight rows */
#define INT4_TILES_CHUNK 4096  /* inputs: 1 MiB of bf16 tiles for 128 rows */

/* Rows [64 t0, 64 (t0 + packs)) by inputs [k0, k1) (whole groups) dequantized ((q - 8) * scale + zero rounded to
   bf16, dequantize_int4_bf16's numbers) into tiles B: [4 * packs][(k1 - k0) / 32][16 input pairs][16 rows][2],
   block c of a pack tile its rows 16c .. 16c + 15. */
static inline __attribute__((target(TILES_ISA))) void dequantize_int4_tiles(const uint8_t *packed, const uint32_t *sz,
                                                                            int64_t K, int64_t group, int64_t t0,
                                                                            int64_t packs, int64_t k0, int64_t k1,
                                                                            uint16_t *tiles) {
    const int64_t steps = (k1 - k0) / 32, groups = K / group;
    const __m512i low = _mm512_set1_epi32(0x0F), eight = _mm512_set1_epi32(8);
    uint16_t order[32];  /* cvtne2ps_pbh's halves (input k, then k + 1) -> pairs (k, k + 1) row by row */
    for (int i = 0; i < 16; i++) order[2 * i] = (uint16_t)i, order[2 * i + 1] = (uint16_t)(16 + i);
    const __m512i pairs = _mm512_loadu_si512(order);
    for (int64_t t = 0; t < packs; t++) {
        const uint8_t *p = packed + (t0 + t) * K * 32;
        uint16_t *out = tiles + 4 * t * steps * 512;
        for (int64_t g = k0 / group; g < k1 / group; g++) {
            __m512 scale[4], zero[4];  /* rows 16c .. 16c + 15: pairs 16c .. */
            for (int c = 0; c < 4; c++) {
                const __m512i sz16 = _mm512_loadu_si512(sz + ((t0 + t) * groups + g) * 64 + 16 * c);
                scale[c] = _mm512_castsi512_ps(_mm512_slli_epi32(sz16, 16));
                zero[c] = _mm512_castsi512_ps(_mm512_and_si512(sz16, _mm512_set1_epi32((int)0xFFFF0000)));
            }
            for (int64_t k = g * group; k < (g + 1) * group; k += 2) {
                __m512 w[2][4];  /* [input k, k + 1][block c] */
                for (int i = 0; i < 2; i++)
                    for (int half = 0; half < 2; half++) {  /* 16 bytes: rows 16 half + j and 32 + 16 half + j */
                        const __m128i bytes = _mm_loadu_si128((const void *)(p + (k + i) * 32 + 16 * half));
                        const __m512i b = _mm512_cvtepu8_epi32(bytes);
                        const __m512i q[2] = {_mm512_sub_epi32(_mm512_and_si512(b, low), eight),
                                              _mm512_sub_epi32(_mm512_srli_epi32(b, 4), eight)};
                        for (int h = 0; h < 2; h++) {
                            const int c = 2 * h + half;
                            w[i][c] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(q[h]), scale[c], zero[c]);
                        }
                    }
                for (int c = 0; c < 4; c++) {
                    const __m512i both = (__m512i)_mm512_cvtne2ps_pbh(w[1][c], w[0][c]);
                    _mm512_store_si512(out + (c * steps + (k - k0) / 32) * 512 + (k - k0) % 32 * 16,
                                       _mm512_permutexvar_epi16(pairs, both));
                }
            }
        }
    }
}

/* Tile `sums` ([16 activation rows][16 weight rows] fp32, in memory) -> y's rows [0, rows), 16 columns, bf16. */
static inline __attribute__((target(TILES_ISA))) void store_rows(const float *sums, uint16_t *y, int64_t N,
                                                                 int64_t rows) {
    for (int64_t i = 0; i < rows; i++)
        _mm256_storeu_si256((void *)(y + i * N), (__m256i)_mm512_cvtneps_pbh(_mm512_load_ps(sums + 16 * i)));
}

/* Each thread's buffers, in elements: the dequantized block (bf16) and the sums between chunks (fp32). */
int64_t int4_tiles_block(int64_t K) { return INT4_TILES_PACKS * 64 * (K < INT4_TILES_CHUNK ? K : INT4_TILES_CHUNK); }
int64_t int4_tiles_sums(int64_t M) { return (M + 31) / 32 * 32 * INT4_TILES_PACKS * 64; }

/* y bf16 [M, N] = x bf16 [M, K] @ W.T, W the int4 weight above; x holds a multiple of 32 rows (those past M
   read, not stored), N % 64 == 0, K % 32 == 0, group a multiple of 32 and a divisor of K; tiles and sums: buffers
   of threads * int4_tiles_block(K) bf16 and threads * int4_tiles_sums(M) fp32. Each thread takes its share of the
   pack tiles. */
__attribute__((target(TILES_ISA))) void int4_tiles_gemm(const uint8_t *packed, const uint32_t *sz, int64_t N,
                                                        int64_t K, int64_t group, const uint16_t *x, int64_t M,
                                                        uint16_t *y, uint16_t *tiles, float *sums, int threads) {
    const int64_t groups = K / group, chunks = (K + INT4_TILES_CHUNK - 1) / INT4_TILES_CHUNK;
    const int64_t chunk_groups = (groups + chunks - 1) / chunks;
#pragma omp parallel num_threads(threads)
    {
        configure_tiles(16);
        const int t = omp_get_thread_num(), nt = omp_get_num_threads();
        const int64_t first = N / 64 * t / nt, last = N / 64 * (t + 1) / nt;
        uint16_t *own = tiles + t * int4_tiles_block(K);
        float (*kept)[256] = (float (*)[256])(sums + t * int4_tiles_sums(M));  /* [M / 32][2 * packs][4 tiles] */
        float out[4][256] __attribute__((aligned(64)));
        for (int64_t t0 = first; t0 < last; t0 += INT4_TILES_PACKS) {
            const int64_t packs = last - t0 < INT4_TILES_PACKS ? last - t0 : INT4_TILES_PACKS;
            for (int64_t c = 0; c < chunks; c++) {
                const int64_t k0 = c * chunk_groups * group;
                const int64_t k1 = k0 + chunk_groups * group < K ? k0 + chunk_groups * group : K;
                const int64_t steps = (k1 - k0) / 32;
                dequantize_int4_tiles(packed, sz, K, group, t0, packs, k0, k1, own);
                for (int64_t m = 0; m < M; m += 32) {
                    const uint16_t *a0 = x + m * K + k0, *a1 = a0 + 16 * K;
                    for (int64_t j = 0; j < 2 * packs; j++) {  /* weight rows 64 t0 + 32 j ..: blocks 2j, 2j + 1 */
                        const uint16_t *b0 = own + 2 * j * steps * 512, *b1 = b0 + steps * 512;
                        float (*keep)[256] = kept + (m / 32 * 2 * INT4_TILES_PACKS + j) * 4;
                        if (c == 0) {
                            _tile_zero(0);
                            _tile_zero(1);
                            _tile_zero(2);
                            _tile_zero(3);
                        } else {
                            _tile_loadd(0, keep[0], 64);
                            _tile_loadd(1, keep[1], 64);
                            _tile_loadd(2, keep[2], 64);
                            _tile_loadd(3, keep[3], 64);
                        }
                        for (int64_t s = 0; s < steps; s++) {
                            _tile_loadd(4, a0 + s * 32, K * 2);
                            _tile_loadd(6, b0 + s * 512, 64);
                            _tile_dpbf16ps(0, 4, 6);
                            _tile_loadd(7, b1 + s * 512, 64);
                            _tile_dpbf16ps(1, 4, 7);
                            _tile_loadd(5, a1 + s * 32, K * 2);
                            _tile_dpbf16ps(2, 5, 6);
                            _tile_dpbf16ps(3, 5, 7);
                        }
                        float (*to)[256] = c + 1 < chunks ? keep : out;
                        _tile_stored(0, to[0], 64);
                        _tile_stored(1, to[1], 64);
                        _tile_stored(2, to[2], 64);
                        _tile_stored(3, to[3], 64);
                        if (c + 1 < chunks) continue;
                        for (int q = 0; q < 4; q++) {  /* tile q: activation group q / 2, weight half q % 2 */
                            const int64_t row = m + 16 * (q / 2), left = M - row < 16 ? M - row : 16;
                            if (left > 0) store_rows(out[q], y + row * N + t0 * 64 + 32 * j + 16 * (q % 2), N, left);
                        }
                    }
                }
            }
        }
        _tile_release();
    }
}

#endif
