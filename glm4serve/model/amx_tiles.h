/* What the AMX kernels (int8_amx.c, bf16_gemm.c, decode_attention.c's AMX build) share: Linux's permission for the
 * tile state, each thread's tile configuration, and a 16 x 16 transpose for the layouts tiles B want. Each includer
 * is a library of its own (one translation unit): amx_request is its exported symbol there. The AMX instructions
 * are enabled by int8_amx.c's compile flags and, in bf16_gemm.c, by each function's target attribute
 * (configure_tiles carries its own). */
#ifndef GLM4SERVE_AMX_TILES_H
#define GLM4SERVE_AMX_TILES_H
#include <immintrin.h>
#include <stdint.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

#define ARCH_REQ_XCOMP_PERM 0x1023
#define XFEATURE_XTILEDATA 18

typedef struct {
    uint8_t palette_id;
    uint8_t start_row;
    uint8_t reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} tile_config;

/* Ask Linux for the AMX tile state (once per process); 0 when granted. */
int amx_request(void) { return (int)syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA); }

/* This thread's 8 tiles, 64 bytes a row: tiles 4-5 16 rows, the others `rows` (int4_amx_gemm's sums and
   activations for a batch of fewer than 16: the tiles' work goes with their rows). */
static inline __attribute__((target("amx-tile"))) void configure_tiles(int rows) {
    tile_config cfg;
    memset(&cfg, 0, sizeof cfg);
    cfg.palette_id = 1;
    for (int t = 0; t < 8; t++) {
        cfg.rows[t] = (uint8_t)(t == 4 || t == 5 ? 16 : rows);
        cfg.colsb[t] = 64;
    }
    _tile_loadconfig(&cfg);
}
/* 16 rows of 16 dwords transposed in place (AVX-512) */
static inline __attribute__((always_inline, target("avx512f"))) void transpose16_dwords(__m512i r[16]) {
    __m512i t[16];
    for (int i = 0; i < 8; i++) {  /* each 128-bit lane: pairs of rows' dwords */
        t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
    }
    for (int i = 0; i < 4; i++) {  /* r[4i + b], lane L: rows 4i..4i+3 of column 4L + b */
        r[4 * i] = _mm512_unpacklo_epi64(t[4 * i], t[4 * i + 2]);
        r[4 * i + 1] = _mm512_unpackhi_epi64(t[4 * i], t[4 * i + 2]);
        r[4 * i + 2] = _mm512_unpacklo_epi64(t[4 * i + 1], t[4 * i + 3]);
        r[4 * i + 3] = _mm512_unpackhi_epi64(t[4 * i + 1], t[4 * i + 3]);
    }
    for (int b = 0; b < 4; b++) {  /* column 4L + b: lane L of r[b], r[4 + b], r[8 + b], r[12 + b] */
        const __m512i lo01 = _mm512_shuffle_i32x4(r[b], r[4 + b], 0x44);
        const __m512i lo23 = _mm512_shuffle_i32x4(r[b], r[4 + b], 0xEE);
        const __m512i hi01 = _mm512_shuffle_i32x4(r[8 + b], r[12 + b], 0x44);
        const __m512i hi23 = _mm512_shuffle_i32x4(r[8 + b], r[12 + b], 0xEE);
        t[b] = _mm512_shuffle_i32x4(lo01, hi01, 0x88);
        t[4 + b] = _mm512_shuffle_i32x4(lo01, hi01, 0xDD);
        t[8 + b] = _mm512_shuffle_i32x4(lo23, hi23, 0x88);
        t[12 + b] = _mm512_shuffle_i32x4(lo23, hi23, 0xDD);
    }
    for (int i = 0; i < 16; i++) r[i] = t[i];
}

#endif
