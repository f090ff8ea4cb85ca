/* What int8_amx.c and bf16_gemm.c's AMX kernels share: Linux's permission for the tile state, and each
 * thread's tile configuration. Each includer is a library of its own (one translation unit): amx_request is
 * its exported symbol there. The AMX instructions are enabled by int8_amx.c's compile flags and, in
 * bf16_gemm.c, by each function's target attribute (configure_tiles carries its own). */
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
#endif
