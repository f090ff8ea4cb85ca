/* fp8 e4m3 (torch.float8_e4m3fn: a sign, 4 exponent bits of bias 7, 3 mantissa bits) widened for the attention
 * kernels (decode_attention.c), the KV cache's elements under --kv-cache-dtype fp8.
 *
 * An e4m3 byte's exponent and mantissa, moved 7 bits up, are an fp16 of the same digits whose exponent is biased
 * 8 more (15 against 7): F16C's conversion widens it, subnormals included, and a product by 2^8 puts the scale
 * back. Every e4m3 value is exact in fp16, fp32 and bf16 (3 mantissa bits, exponents 2^-9 .. 2^8), so these are
 * torch's `.to(float32)` and `.to(bfloat16)` bit for bit. torch's cast saturates at e4m3's +-448 (attention.store_kv): its
 * nan bytes (0x7f, 0xff) never reach a cache. */
#ifndef GLM4SERVE_FP8_H
#define GLM4SERVE_FP8_H
#include <immintrin.h>
#include <stdint.h>

/* 8 bytes -> their fp16 digits (exponent bias 15 standing for 7) */
static inline __attribute__((always_inline, target("avx2,f16c"))) __m128i fp8x8_as_fp16(const uint8_t *s) {
    const __m128i w = _mm_cvtepu8_epi16(_mm_loadl_epi64((const __m128i *)s));
    return _mm_or_si128(_mm_slli_epi16(_mm_and_si128(w, _mm_set1_epi16(0x7F)), 7),
                        _mm_slli_epi16(_mm_and_si128(w, _mm_set1_epi16(0x80)), 8));
}

/* 8 e4m3 values -> fp32 */
static inline __attribute__((always_inline, target("avx2,f16c"))) __m256 fp8x8_to_ps(const uint8_t *s) {
    return _mm256_mul_ps(_mm256_cvtph_ps(fp8x8_as_fp16(s)), _mm256_set1_ps(256.0f));
}

/* 16 e4m3 values -> fp32, in integer steps as fp8x32_to_bf16's (exponent bias 127 against 7) */
static inline __attribute__((always_inline, target("avx512f"))) __m512 fp8x16_to_ps(const uint8_t *s) {
    const __m512i subnormals = _mm512_set_epi32(0, 0, 0, 0, 0, 0, 0, 0, 0x3C600000, 0x3C400000, 0x3C200000,
                                                0x3C000000, 0x3BC00000, 0x3B800000, 0x3B000000, 0);
    const __m512i w = _mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)s));  /* sign-extended */
    const __m512i mag = _mm512_and_si512(w, _mm512_set1_epi32(0x7F));
    __m512i r = _mm512_add_epi32(_mm512_slli_epi32(mag, 20), _mm512_set1_epi32(120 << 23));
    r = _mm512_mask_permutexvar_epi32(r, _mm512_testn_epi32_mask(w, _mm512_set1_epi32(0x78)), mag, subnormals);
    return _mm512_castsi512_ps(_mm512_ternarylogic_epi32(r, w, _mm512_set1_epi32((int)0x80000000), 0xF8));
}

/* 32 e4m3 values (bytes) -> bf16 (exact), in 16-bit integer steps: a normal number's exponent and mantissa moved 4 bits up
 * are bf16's with the exponent biased 120 less (127 against 7); the subnormals (exponent 0: m x 2^-9) come from a
 * table of 8. 1.3x quicker than through fp16 and fp32 in a 32K-token decode (BENCHMARKS.md). */
static inline __attribute__((always_inline, target("avx512f,avx512bw"))) __m512i fp8x32_to_bf16(__m256i bytes) {
    const __m512i subnormals = _mm512_set_epi16(0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
                                                0x3C60, 0x3C40, 0x3C20, 0x3C00, 0x3BC0, 0x3B80, 0x3B00, 0);
    const __m512i w = _mm512_cvtepi8_epi16(bytes);  /* sign-extended: a negative one's bit 15 set */
    const __m512i mag = _mm512_and_si512(w, _mm512_set1_epi16(0x7F));
    __m512i r = _mm512_add_epi16(_mm512_slli_epi16(mag, 4), _mm512_set1_epi16(120 << 7));
    r = _mm512_mask_permutexvar_epi16(r, _mm512_testn_epi16_mask(w, _mm512_set1_epi16(0x78)), mag, subnormals);
    return _mm512_ternarylogic_epi32(r, w, _mm512_set1_epi16((short)0x8000), 0xF8);  /* r | (w & 0x8000) */
}
#endif
