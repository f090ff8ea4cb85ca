/* Included by decode_attention_kernel.h for the AVX-512 BF16 build (BF16_DOT). */

/* attend's twin for bf16 caches on CPUs with AVX-512 BF16: K and V read as they are, `vdpbf16ps` multiplying
 * pairs of bf16 into fp32 lanes, half the instructions. qP [D / 2] for each query, q_stride apart: each lane holds
 * a query head's elements 2i and 2i + 1 (unscaled); a score is their pairs against a key's pairs, broadcast. The
 * weights p are rounded to bf16 for the weighted sum of values (as flash attention's GPU kernels round them), whose
 * pairs are two tokens'.
 *
 * pack 2 (KV heads h and h + 1 a vector, for groups of LANES / 2 query heads): even lanes are h's heads, odd lanes
 * h + 1's, and each step's keys and values are first laid out as the two heads' pairs side by side (kq, vq), so
 * one 64-bit broadcast serves both. Without it glm-4-9b-chat-1m's groups of 8 would leave half of every vector
 * idle. */
INLINE void F(attend_dot)(const int pack, const __m512i *qP, int64_t q_stride, int64_t nq, int64_t first_limit,
                          float scale, const uint16_t *kc, const uint16_t *vc, const int64_t *table,
                          int64_t block_size, int64_t Hkv, int64_t h, int64_t D, int64_t t0, int64_t t1, vec *res,
                          int64_t res_stride) {
    static const uint16_t zeros[MAX_D];  /* the rows past a step's tokens: 0 x (0 weight) adds nothing */
    uint32_t vP[NT / 2 * MAX_D] __attribute__((aligned(64)));  /* [NT / 2][D]: two tokens' value elements */
    uint64_t kq[NT * MAX_D / 2] __attribute__((aligned(64)));  /* pack 2: [NT][D / 2] two KV heads' key pairs */
    uint64_t vq[NT / 2 * MAX_D] __attribute__((aligned(64)));  /* pack 2: [NT / 2][D] two KV heads' value pairs */
    const __m512i interleave = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8,
                                                23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
    const int64_t stride = Hkv * D;
    F(start_queries)(nq, D, res, res_stride);
    for (int64_t t = t0; t < t1;) {
        int64_t row;
        const int64_t n = F(step_at)((const char *)kc, (const char *)vc, 2, table, block_size, stride, h, D, pack,
                                     t, t0, t1, &row);
        const uint16_t *k[NT], *v[NT], *k2[NT], *v2[NT];  /* k2, v2: KV head h + 1's rows, where pack == 2 */
        for (int i = 0; i < NT; i++) {
            k[i] = i < n ? kc + row + i * stride : zeros;
            v[i] = i < n ? vc + row + i * stride : zeros;
            k2[i] = i < n ? k[i] + D : zeros;
            v2[i] = i < n ? v[i] + D : zeros;
        }
        if (pack == 2) {
            for (int i = 0; i < NT; i++)
                for (int64_t d2 = 0; d2 < D / 2; d2++) {
                    uint32_t a, b;
                    memcpy(&a, k[i] + 2 * d2, 4);
                    memcpy(&b, k2[i] + 2 * d2, 4);
                    kq[i * (MAX_D / 2) + d2] = a | (uint64_t)b << 32;
                }
            for (int i = 0; i < NT / 2; i++) {
                const uint16_t *a = v[2 * i], *b = v[2 * i + 1], *a2 = v2[2 * i], *b2 = v2[2 * i + 1];
                for (int64_t d = 0; d < D; d++)
                    vq[i * MAX_D + d] = (a[d] | (uint32_t)b[d] << 16) | (uint64_t)(a2[d] | (uint32_t)b2[d] << 16) << 32;
            }
        } else {
            for (int i = 0; i < NT / 2; i++) {
                const uint16_t *a = v[2 * i], *b = v[2 * i + 1];
                for (int64_t d = 0; d < D; d++) vP[i * D + d] = a[d] | (uint32_t)b[d] << 16;
            }
        }
        for (int64_t r = 0; r < nq; r++) {
            const int64_t nr = first_limit + r - t < n ? first_limit + r - t : n;  /* tokens query r sees */
            if (nr <= 0) continue;
            vec *acc = res + r * res_stride + 2;
            const __m512i *qr = qP + r * q_stride;
            vec s[NT];
            for (int i = 0; i < NT; i++) s[i] = F(splat)(0.0f);
            for (int64_t d2 = 0; d2 < D / 2; d2++) {
                const __m512bh q = (__m512bh)qr[d2];
                for (int i = 0; i < NT; i++) {
                    __m512i key;
                    if (pack == 2) {
                        key = _mm512_set1_epi64((long long)kq[i * (MAX_D / 2) + d2]);
                    } else {
                        uint32_t pair;
                        memcpy(&pair, k[i] + 2 * d2, 4);
                        key = _mm512_set1_epi32((int)pair);
                    }
                    s[i] = (vec)_mm512_dpbf16_ps((__m512)s[i], q, (__m512bh)key);
                }
            }
            for (int i = 0; i < NT; i++) s[i] *= scale;
            vec p[NT];
            const vec alpha = F(softmax_step)(s, nr, NT, res + r * res_stride, res + r * res_stride + 1, p);
            __m512i pP[NT / 2];  /* lane g: (p[2i][g], p[2i + 1][g]) in bf16 */
            for (int i = 0; i < NT / 2; i++)
                pP[i] = _mm512_permutexvar_epi16(interleave, (__m512i)_mm512_cvtne2ps_pbh((__m512)p[2 * i + 1],
                                                                                         (__m512)p[2 * i]));
            for (int64_t d = 0; d < D; d += DT) {
                vec a[DT];
                for (int j = 0; j < DT; j++) a[j] = acc[d + j] * alpha;
                for (int i = 0; i < NT / 2; i++)
                    for (int j = 0; j < DT; j++) {
                        const __m512i value = pack == 2 ? _mm512_set1_epi64((long long)vq[i * MAX_D + d + j])
                                                        : _mm512_set1_epi32((int)vP[i * D + d + j]);
                        a[j] = (vec)_mm512_dpbf16_ps((__m512)a[j], (__m512bh)pP[i], (__m512bh)value);
                    }
                for (int j = 0; j < DT; j++) acc[d + j] = a[j];
            }
        }
        t += n;
    }
}
