/* One bf16 value to and from fp32, for the C kernels' scalar edges (bf16_gemm.c, decode_attention.c). */
#ifndef GLM4SERVE_BF16_SCALAR_H
#define GLM4SERVE_BF16_SCALAR_H
#include <stdint.h>

static inline __attribute__((always_inline)) uint16_t to_bf16(float f) {
    union { float f; uint32_t u; } v = {f};
    return (uint16_t)((v.u + 0x7FFF + ((v.u >> 16) & 1)) >> 16);  /* round to nearest even */
}

static inline __attribute__((always_inline)) float from_bf16(uint16_t b) {
    union { uint32_t u; float f; } v = {(uint32_t)b << 16};
    return v.f;
}
#endif
