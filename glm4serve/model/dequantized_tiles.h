/* Part of int8_amx.c (its one translation unit, after bf16_to_float): prefill chunks' products on AMX-BF16 tiles,
 * int8 and int4 weights times bf16 activations (int8_kernel.tiles_fit, int4_tiles_fit). There int8_amx.c's products
 * (twice the tile products, for int16 activations) fall behind a bf16 product, which needed the weight dequantized
 * to bf16 in memory first (int8_kernel.blockwise_matmul, int4_matmul), a pass of 3 bytes a weight through memory at
 * every chunk, and oneDNN's reorder of it for its tiles. Here each thread dequantizes TILES_ROWS weight rows at a
 * time into tiles B in its own buffer, 1 MiB for 4,096 inputs, which stays in its L2 while every activation row is
 * multiplied with it. A tile B row holds 2 consecutive inputs of 16 weight rows; the activations are tiles A as they
 * lie in x (16 rows x 32 inputs, a row every K inputs), and the sums come out [activation rows][weight rows], as y
 * wants them: x is not re-laid out. Tiles 0-3 the sums (2 groups of 16 activation rows x 2 of 16 weight rows), 4-5
 * the activations, 6-7 the weights; the sums in fp32, rounded to bf16 once, as oneDNN's bf16 product has them. Of
 * more than TILES_CHUNK inputs (glm-4-9b's down projection, 13,696) a chunk at a time, the sums kept in fp32 between
 * chunks: the block stays in L2, and the activations are read once per block of rows whatever K. */
#ifndef GLM4SERVE_DEQUANTIZED_TILES_H
#define GLM4SERVE_DEQUANTIZED_TILES_H
#include <omp.h>

#include "amx_tiles.h"

#define TILES_ROWS 128    /* weight rows dequantized at a time */
#define TILES_CHUNK 4096  /* inputs: 1 MiB of bf16 tiles for TILES_ROWS rows */
#define TILES_ISA "amx-tile,amx-bf16,avx512f,avx512bw,avx512bf16"

/* Each thread's buffers, in elements: the dequantized block (bf16) and the sums between chunks (fp32). */
int64_t tiles_block(int64_t K) { return TILES_ROWS * (K < TILES_CHUNK ? K : TILES_CHUNK); }
int64_t tiles_sums(int64_t M) { return (M + 31) / 32 * 32 * TILES_ROWS; }

/* int8 weights, w int8 [N, K] row-major and a bf16 scale per row: rows [n0, n0 + rows) by inputs [k0, k1)
   dequantized (w * scale, rounded to bf16, dequantize_bf16's numbers) into tiles B: [rows / 16][(k1 - k0) / 32][16
   input pairs][16 rows][2]. Each row's 32 inputs are 16 pairs, one dword each: 16 rows' transposed give 16 B rows. */
static inline __attribute__((target(TILES_ISA))) void dequantize_int8_tiles(const int8_t *w, const uint16_t *scale,
                                                                            int64_t K, int64_t n0, int64_t rows,
                                                                            int64_t k0, int64_t k1, uint16_t *tiles) {
    const int64_t steps = (k1 - k0) / 32;
    for (int64_t b = 0; b < rows / 16; b++) {
        __m512 s[16];
        for (int i = 0; i < 16; i++) s[i] = _mm512_set1_ps(bf16_to_float(scale[n0 + 16 * b + i]));
        for (int64_t k = k0; k < k1; k += 32) {
            __m512i r[16];
            for (int i = 0; i < 16; i++) {
                const __m256i q = _mm256_loadu_si256((const void *)(w + (n0 + 16 * b + i) * K + k));
                const __m512 lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_castsi256_si128(q)));
                const __m512 hi = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_extracti128_si256(q, 1)));
                r[i] = (__m512i)_mm512_cvtne2ps_pbh(_mm512_mul_ps(hi, s[i]), _mm512_mul_ps(lo, s[i]));
            }
            transpose16_dwords(r);
            uint16_t *out = tiles + (b * steps + (k - k0) / 32) * 512;
            for (int i = 0; i < 16; i++) _mm512_store_si512(out + 32 * i, r[i]);
        }
    }
}

/* int4 weights (quant.py's Int4Linear, as int8_gemm.c's dequantize_int4_bf16 reads them): packed [N / 64][K][32]
   bytes, byte j of (tile t, input k) holding row 64t + j in its low nibble and 64t + 32 + j in its high one; the
   (scale, zero) pairs [N / 64][K / group][64]. Rows [64 t0, 64 (t0 + packs)) by inputs [k0, k1) (whole groups)
   dequantized ((q - 8) * scale + zero rounded to bf16, dequantize_int4_bf16's numbers) into tiles B: [4 * packs]
   [(k1 - k0) / 32][16 input pairs][16 rows][2], block c of a pack tile its rows 16c .. 16c + 15. The packed layout
   keeps each input's 64 rows side by side, so the 64 bytes of two inputs give four B rows with no transpose. */
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

/* Tiles 0-3 from `kept` (or zero, the first chunk), and back to it (or to `out`, the last). */
static inline __attribute__((target(TILES_ISA))) void start_sums(int first, float (*kept)[256]) {
    if (first) {
        _tile_zero(0);
        _tile_zero(1);
        _tile_zero(2);
        _tile_zero(3);
    } else {
        _tile_loadd(0, kept[0], 64);
        _tile_loadd(1, kept[1], 64);
        _tile_loadd(2, kept[2], 64);
        _tile_loadd(3, kept[3], 64);
    }
}
static inline __attribute__((target(TILES_ISA))) void end_sums(float (*to)[256]) {
    _tile_stored(0, to[0], 64);
    _tile_stored(1, to[1], 64);
    _tile_stored(2, to[2], 64);
    _tile_stored(3, to[3], 64);
}

/* The inputs of each chunk of K: as few chunks of at most TILES_CHUNK as there can be, in whole units. */
static inline int64_t chunk_inputs(int64_t K, int64_t unit) {
    const int64_t chunks = (K + TILES_CHUNK - 1) / TILES_CHUNK, units = K / unit;
    return (units + chunks - 1) / chunks * unit;
}

/* y bf16 [M, N] = x bf16 [M, K] @ W.T, W int8 (w, scale) or int4 (packed in w, its pairs in scale, `group` > 0);
   `tail` x's last M % 32 rows and zeros below them, 32 rows (unread where M % 32 == 0: x is not copied whole to pad
   it); N % 32 == 0 (int4: % 64), K % 32 == 0 (int4: group
   a multiple of 32 and a divisor of K); tiles and sums: buffers of threads * tiles_block(K) bf16 and
   threads * tiles_sums(M) fp32. Each thread takes its share of the weight's rows, in blocks of TILES_ROWS. */
static inline __attribute__((always_inline, target(TILES_ISA))) void tiles_gemm(const void *w, const void *scale,
                                                                                int64_t group, int64_t N, int64_t K,
                                                                                const uint16_t *x, const uint16_t *tail,
                                                                                int64_t M, uint16_t *y,
                                                                                uint16_t *tiles, float *sums,
                                                                                int threads) {
    const int64_t unit = group ? 64 : 32, chunk = chunk_inputs(K, group ? group : 32);  /* rows: int4's pack tiles */
#pragma omp parallel num_threads(threads)
    {
        configure_tiles(16);
        const int t = omp_get_thread_num(), nt = omp_get_num_threads();
        const int64_t first = N / unit * t / nt * unit, last = N / unit * (t + 1) / nt * unit;
        uint16_t *own = tiles + t * tiles_block(K);
        float (*kept)[256] = (float (*)[256])(sums + t * tiles_sums(M));  /* [M / 32][TILES_ROWS / 32][4 tiles] */
        float out[4][256] __attribute__((aligned(64)));
        for (int64_t n0 = first; n0 < last; n0 += TILES_ROWS) {
            const int64_t rows = last - n0 < TILES_ROWS ? last - n0 : TILES_ROWS;
            for (int64_t k0 = 0; k0 < K; k0 += chunk) {
                const int64_t k1 = k0 + chunk < K ? k0 + chunk : K, steps = (k1 - k0) / 32;
                if (group)
                    dequantize_int4_tiles(w, scale, K, group, n0 / 64, rows / 64, k0, k1, own);
                else
                    dequantize_int8_tiles(w, scale, K, n0, rows, k0, k1, own);
                for (int64_t m = 0; m < M; m += 32) {
                    const uint16_t *a0 = (m + 32 <= M ? x + m * K : tail) + k0, *a1 = a0 + 16 * K;
                    for (int64_t j = 0; j < rows / 32; j++) {  /* weight rows n0 + 32 j ..: blocks 2j, 2j + 1 */
                        const uint16_t *b0 = own + 2 * j * steps * 512, *b1 = b0 + steps * 512;
                        float (*keep)[256] = kept + (m / 32 * (TILES_ROWS / 32) + j) * 4;
                        start_sums(k0 == 0, keep);
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
                        end_sums(k1 < K ? keep : out);
                        if (k1 < K) continue;
                        for (int q = 0; q < 4; q++) {  /* tile q: activation group q / 2, weight half q % 2 */
                            const int64_t row = m + 16 * (q / 2), left = M - row < 16 ? M - row : 16;
                            if (left > 0) store_rows(out[q], y + row * N + n0 + 32 * j + 16 * (q % 2), N, left);
                        }
                    }
                }
            }
        }
        _tile_release();
    }
}

__attribute__((target(TILES_ISA))) void int8_tiles_gemm(const int8_t *w, const uint16_t *scale, int64_t N, int64_t K,
                                                        const uint16_t *x, const uint16_t *tail, int64_t M,
                                                        uint16_t *y, uint16_t *tiles, float *sums, int threads) {
    tiles_gemm(w, scale, 0, N, K, x, tail, M, y, tiles, sums, threads);
}

__attribute__((target(TILES_ISA))) void int4_tiles_gemm(const uint8_t *packed, const uint32_t *sz, int64_t N,
                                                        int64_t K, int64_t group, const uint16_t *x,
                                                        const uint16_t *tail, int64_t M, uint16_t *y, uint16_t *tiles,
                                                        float *sums, int threads) {
    tiles_gemm(packed, sz, group, N, K, x, tail, M, y, tiles, sums, threads);
}

#endif
