/* Included by decode_attention_kernel.h for the AMX build (AMX): attend_dot's twin on AMX-BF16 tiles, for bf16
 * caches in blocks of a multiple of 16 tokens and head sizes of a multiple of 32, and fp8 ones whose steps are first
 * widened to bf16 (exact) into a buffer of the step's rows.
 *
 * On a Sapphire Rapids core vdpbf16ps issues once a cycle, so attend_dot's 128 of them a token and KV head, not the
 * memory, bound a decode (level with PyTorch's gather and SDPA there, whose products run on the tiles). Here a step
 * is 16 tokens of one block, and both products are tiles read from the cache as they lie:
 * - scores: the keys are tile A (16 tokens x 32 of their elements, the token stride apart) and the query tile B
 *   (load_query's pairs, [D / 2][16 heads]), so each row of the sums is one token's scores for the 16 heads: the
 *   s[i] vectors of attend_dot, into the same online softmax.
 * - values: the values are tile B as they lie (16 tokens x 32 elements): tdpbf16ps pairs B's elements 2n and 2n + 1
 *   against A's 2k and 2k + 1, so the weights go in twice, as A_even (each token's weight, then 0) and A_odd (0,
 *   then the weight), whose sums are the even and the odd elements of the output (rows: the heads).
 * The weights are rounded to bf16, as attend_dot rounds them. Each query's output is kept [16 heads][D], each 32
 * elements as their 16 even then 16 odd ones, rescaled by row as its max grows, and written to res at the end.
 * Tiles (configure_tiles(16): 16 rows of 64 bytes): 0 scores, 1 keys, 2 query, 3 A_even, 4 A_odd, 5 values, 6-7 the
 * output's even and odd sums. */

#define AMX_STEP 16  /* tokens a step: a tile's rows */
/* Each thread's output rows start AMX_OUT_SKEW floats past a page's start, AMX_OUT_PAD floats past the last
 * thread's: page-aligned, they lay 512 bytes apart as the caches' rows do, and the steps measured 1.10-1.16x slower
 * (loads of a step's values that seem to wait on the stores of its outputs, 4 KiB apart) */
#define AMX_OUT_SKEW 16
#define AMX_OUT_PAD 256

/* attend_amx takes caches of these blocks and head sizes */
INLINE int F(amx_takes)(int64_t block_size, int64_t D) { return block_size % AMX_STEP == 0 && D % 32 == 0; }

/* p [16 tokens] vecs of 16 heads' weights -> a_even, a_odd [16 heads][16 tokens] dwords (bf16 low or high) */
INLINE void F(weights_by_head)(const vec *p, uint32_t *a_even, uint32_t *a_odd) {
    uint32_t by_token[AMX_STEP * LANES] __attribute__((aligned(64)));
    for (int i = 0; i < AMX_STEP; i++)
        _mm512_store_si512(by_token + i * LANES, _mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh((__m512)p[i])));
    const __m512i column = _mm512_mullo_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
                                              _mm512_set1_epi32(LANES));
    for (int g = 0; g < LANES; g++) {
        const __m512i row = _mm512_i32gather_epi32(_mm512_add_epi32(column, _mm512_set1_epi32(g)), by_token, 4);
        _mm512_store_si512(a_even + g * AMX_STEP, row);
        _mm512_store_si512(a_odd + g * AMX_STEP, _mm512_slli_epi32(row, 16));
    }
}

INLINE void F(attend_amx)(const uint32_t *qP, int64_t q_stride, int64_t nq, int64_t first_limit, float scale,
                          const void *kc, const void *vc, int fp8, const int64_t *table, int64_t block_size,
                          int64_t Hkv, int64_t h, int64_t D, int64_t t0, int64_t t1, vec *res, int64_t res_stride,
                          float *out /* [nq][16 heads][D], each 32 elements' even then odd ones */) {
    uint16_t kz[AMX_STEP * MAX_D] __attribute__((aligned(64))), vz[AMX_STEP * MAX_D] __attribute__((aligned(64)));
    float sums[AMX_STEP * LANES] __attribute__((aligned(64)));
    uint32_t a_even[LANES * AMX_STEP] __attribute__((aligned(64)));
    uint32_t a_odd[LANES * AMX_STEP] __attribute__((aligned(64)));
    memset(out, 0, (size_t)(nq * LANES * D) * sizeof(float));
    const int64_t stride = Hkv * D, esize = fp8 ? 1 : 2;
    F(start_queries)(nq, D, res, res_stride);
    F(prefetch_tokens)((const char *)kc, (const char *)vc, esize, table, block_size, stride, h, D, 1, t0,
                       t0 + 2 * AMX_STEP, t1);
    for (int64_t t = t0; t < t1; t += AMX_STEP) {
        const int64_t n = t1 - t < AMX_STEP ? t1 - t : AMX_STEP;
        const int64_t row = (table[t / block_size] * block_size + t % block_size) * stride + h * D;
        F(prefetch_tokens)((const char *)kc, (const char *)vc, esize, table, block_size, stride, h, D, 1,
                           t + 2 * AMX_STEP, t + 3 * AMX_STEP, t1);
        const uint16_t *k = (const uint16_t *)kc + row, *v = (const uint16_t *)vc + row;
        int64_t kv_stride = stride;
        if (fp8 || n < AMX_STEP) {  /* fp8 widened; the slots past the context may hold anything (nan x 0 is nan) */
            if (n < AMX_STEP) {
                memset(kz + n * D, 0, (AMX_STEP - n) * D * 2);
                memset(vz + n * D, 0, (AMX_STEP - n) * D * 2);
            }
            for (int64_t i = 0; i < n; i++) {
                if (fp8) {
                    const uint8_t *k8 = (const uint8_t *)kc + row + i * stride;
                    const uint8_t *v8 = (const uint8_t *)vc + row + i * stride;
                    for (int64_t c = 0; c < D; c += 32) {
                        _mm512_store_si512(kz + i * D + c, fp8x32_to_bf16(_mm256_loadu_si256((const void *)(k8 + c))));
                        _mm512_store_si512(vz + i * D + c, fp8x32_to_bf16(_mm256_loadu_si256((const void *)(v8 + c))));
                    }
                } else {
                    memcpy(kz + i * D, k + i * stride, D * 2);
                    memcpy(vz + i * D, v + i * stride, D * 2);
                }
            }
            k = kz, v = vz, kv_stride = D;
        }
        for (int64_t r = 0; r < nq; r++) {
            const int64_t nr = first_limit + r - t < n ? first_limit + r - t : n;  /* tokens query r sees */
            if (nr <= 0) continue;
            const uint32_t *q = qP + r * q_stride * LANES;
            _tile_zero(0);
            for (int64_t c = 0; c < D; c += 32) {
                _tile_loadd(1, k + c, kv_stride * 2);
                _tile_loadd(2, q + c / 2 * LANES, 64);
                _tile_dpbf16ps(0, 1, 2);
            }
            _tile_stored(0, sums, 64);
            vec *mv = res + r * res_stride;
            const vec m0 = *mv;
            vec s[AMX_STEP], p[AMX_STEP];
            for (int i = 0; i < nr; i++) s[i] = *(const vec *)(sums + i * LANES) * scale;
            const vec alpha = F(softmax_step)(s, nr, AMX_STEP, mv, mv + 1, p);
            float *o = out + r * LANES * D;
            if (_mm512_cmp_ps_mask((__m512)m0, (__m512)*mv, _CMP_NEQ_OQ)) {  /* the max grew: rescale the rows */
                for (int g = 0; g < LANES; g++) {
                    const __m512 a = _mm512_set1_ps(alpha[g]);
                    for (int64_t d = 0; d < D; d += 16)
                        _mm512_store_ps(o + g * D + d, _mm512_mul_ps(_mm512_load_ps(o + g * D + d), a));
                }
            }
            F(weights_by_head)(p, a_even, a_odd);
            _tile_loadd(3, a_even, 64);
            _tile_loadd(4, a_odd, 64);
            for (int64_t c = 0; c < D; c += 32) {
                _tile_loadd(5, v + c, kv_stride * 2);
                _tile_loadd(6, o + c, D * 4);
                _tile_loadd(7, o + c + 16, D * 4);
                _tile_dpbf16ps(6, 3, 5);
                _tile_dpbf16ps(7, 4, 5);
                _tile_stored(6, o + c, D * 4);
                _tile_stored(7, o + c + 16, D * 4);
            }
        }
    }
    for (int64_t r = 0; r < nq; r++) {  /* [16 heads][D] (even, odd per 32) -> res's acc [D][16 heads] */
        float *acc = (float *)(res + r * res_stride + 2);
        const float *o = out + r * LANES * D;
        for (int64_t d = 0; d < D; d++) {
            const int64_t at = d / 32 * 32 + (d % 2) * 16 + d % 32 / 2;
            for (int g = 0; g < LANES; g++) acc[d * LANES + g] = o[g * D + at];
        }
    }
}
