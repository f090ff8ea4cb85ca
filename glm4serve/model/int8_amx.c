/* int8 weights times int16 activations on AMX tiles, for batches of rows (int8_kernel.py builds it
 * where the CPU has AMX-INT8; quant.py's Int8Linear weights, unchanged: no repacking, no copy).
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

static inline float bf16_to_float(uint16_t b) {
    union { uint32_t u; float f; } v = {(uint32_t)b << 16};
    return v.f;
}

/* Ask Linux for the AMX tile state (once per process); 0 when granted. */
int amx_request(void) { return (int)syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA); }

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
        tile_config cfg;
        memset(&cfg, 0, sizeof cfg);
        cfg.palette_id = 1;
        for (int t = 0; t < 8; t++) {
            cfg.rows[t] = 16;
            cfg.colsb[t] = 64;
        }
        _tile_loadconfig(&cfg);
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
                _tile_stored(0, sums[0], 64);
                _tile_stored(1, sums[1], 64);
                _tile_stored(2, sums[2], 64);
                _tile_stored(3, sums[3], 64);
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
