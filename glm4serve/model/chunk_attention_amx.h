/* Included by decode_attention.c in its AMX build (ISA as there): a prompt chunk's causal attention over its
 * sequence's paged bf16 cache on AMX-BF16 tiles, flash attention's way, with head size 128 and query groups that
 * divide 16 (glm-4-9b: 16 query heads a KV head, the 1M variant 8).
 *
 * The decode kernel (decode_attention_amx.h) multiplies each query's own tiles against each step's keys, which
 * bounds it past a few dozen queries. Here the rows of a tile are 16 (query, head) pairs of one KV head, and a unit
 * of work is CHUNK_ROWS of them over its KV head's context, a kv block of CHUNK_KV tokens at a time:
 * - the block's keys and values are packed once into the layouts tiles B want (keys transposed into pairs of
 *   elements by token, values into pairs of tokens by element), then serve all the unit's rows from L2;
 * - two row groups at a time, so that each tile loaded (from L2, the keys' and values') serves two products: with
 *   one, the loads rather than the products bounded the tiles' part (1.07-1.10x);
 * - a pair's softmax (vector instructions) takes turns with the next pair's scores (tiles), so that both run at once
 *   (1.05-1.08x); parts that follow each other in the code ran one after the other;
 * - scores: the rows' queries are tiles A (16 rows x 32 elements) against the packed keys, 16 tokens a tile of sums;
 * - the softmax runs by row along the block's scores (base 2, the scale times log2 e folded in), each row's weights
 *   rounded to bf16 into the first half of its scores' row, tile A of the values' product as it lies; the output
 *   rows [16][128] (fp32, in memory) are rescaled once a block, where their max grew;
 * - each query sees the tokens up to its own (the chunk is the context's last n tokens): past it the weights are 0,
 *   and a row group stops at its last query's token. */

#define CHUNK_KV 256    /* tokens of a kv block */
#define CHUNK_ROWS 1024 /* (query, head) rows of a unit: its outputs [1024][128] fp32 (512 KiB) stay in L2 */
#define CHUNK_D 128     /* the head size */
#define CHUNK_FN static inline __attribute__((always_inline, target(ISA)))

/* Per thread: the unit's queries by row, outputs, maxes and sums; a kv block's packed keys and values; two pairs of
 * row groups' scores and weights; a row of zeros for the tokens past the context. */
struct __attribute__((aligned(64))) chunk_scratch {
    uint16_t qrows[CHUNK_ROWS * CHUNK_D];
    float o[CHUNK_ROWS * CHUNK_D];
    float m[CHUNK_ROWS], l[CHUNK_ROWS];
    uint32_t kp[CHUNK_KV / 16 * CHUNK_D / 32 * 256];  /* [16-token step][32-element slice][16 pairs][16 tokens] */
    uint32_t vp[CHUNK_KV / 32 * CHUNK_D / 16 * 256];  /* [32-token step][16-element slice][16 token pairs][16] */
    float s[2][2][16 * CHUNK_KV];  /* [pair][group]: the scores, then the weights (bf16, each row's first half) */
    uint16_t zeros[CHUNK_D];
};

struct chunk_job {
    const uint16_t *q;  /* [n][Hq][128] */
    const void *kc, *vc;  /* [blocks][block_size][Hkv][128], bf16 or (fp8) e4m3 */
    int fp8;
    const int64_t *table;
    int64_t ctx, n, Hq, Hkv, G, block_size, queries_per_unit, blocks_of_queries;
    float c;  /* the scale times log2 e */
    uint16_t *out;
    struct chunk_scratch *scratch;
};

/* 2^x for x <= 0: 2^round(x) times a polynomial of the rest, |rest| <= 1/2 (relative error ~1e-7); below -149, 0.
 * Not the decode kernel's vexp: `vscalefps` spares its clamp and integer steps, and the whole kernel took 1.08-1.18x
 * longer with vexp in its place (the softmax's vector work is a third of it). */
CHUNK_FN __m512 chunk_exp2(__m512 x) {
    const __m512 n = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m512 f = _mm512_sub_ps(x, n);
    __m512 p = _mm512_set1_ps(1.5403530393381606e-4f);
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.3333558146428443e-3f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.618129107628477e-3f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.550410866482158e-2f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.2402265069591007f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.6931471805599453f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
    return _mm512_scalef_ps(p, n);
}

/* The first `seen` of 16 lanes (any count) */
CHUNK_FN __mmask16 chunk_lanes(int64_t seen) {
    return seen >= 16 ? 0xFFFF : seen <= 0 ? 0 : (__mmask16)((1u << seen) - 1);
}

/* Tokens [t0, t0 + tokens) (a multiple of 32) of KV head h into s->kp and s->vp; those from `end` on as zeros. fp8
 * caches are widened to bf16 (exact) as they are packed. */
CHUNK_FN void chunk_pack(const struct chunk_job *j, struct chunk_scratch *s, int64_t h, int64_t t0, int64_t tokens,
                         int64_t end) {
    const char *krow[CHUNK_KV], *vrow[CHUNK_KV];  /* rows of 128 elements, 1 or 2 bytes each */
    const int64_t esize = j->fp8 ? 1 : 2;
    for (int64_t i = 0; i < tokens; i++) {
        const int64_t t = t0 + i;
        if (t >= end) {
            krow[i] = vrow[i] = (const char *)s->zeros;
            continue;
        }
        const int64_t row = ((j->table[t / j->block_size] * j->block_size + t % j->block_size) * j->Hkv + h) * CHUNK_D;
        krow[i] = (const char *)j->kc + row * esize, vrow[i] = (const char *)j->vc + row * esize;
    }
    for (int64_t step = 0; step < tokens / 16; step++)  /* keys: tile B [16 element pairs][16 tokens] */
        for (int c = 0; c < CHUNK_D / 32; c++) {
            __m512i r[16];
            for (int i = 0; i < 16; i++) {
                const char *at = krow[step * 16 + i] + c * 32 * esize;
                r[i] = j->fp8 ? fp8x32_to_bf16(_mm256_loadu_si256((const void *)at)) : _mm512_loadu_si512(at);
            }
            transpose16_dwords(r);
            uint32_t *tile = s->kp + (step * (CHUNK_D / 32) + c) * 256;
            for (int i = 0; i < 16; i++) _mm512_store_si512(tile + i * 16, r[i]);
        }
    uint16_t pairs[32], halves[32];  /* word 2i: the even token's element i, 2i + 1: the odd one's */
    for (int i = 0; i < 16; i++) {
        pairs[2 * i] = (uint16_t)i, pairs[2 * i + 1] = (uint16_t)(32 + i);  /* of two vectors */
        halves[2 * i] = (uint16_t)i, halves[2 * i + 1] = (uint16_t)(16 + i);  /* of one, the two tokens' halves */
    }
    const __m512i interleave = _mm512_loadu_si512(pairs), interleave_halves = _mm512_loadu_si512(halves);
    for (int64_t step = 0; step < tokens / 32; step++)  /* values: tile B [16 token pairs][16 elements] */
        for (int c = 0; c < CHUNK_D / 16; c++) {
            uint32_t *tile = s->vp + (step * (CHUNK_D / 16) + c) * 256;
            for (int i = 0; i < 16; i++) {
                const char *even = vrow[step * 32 + 2 * i] + c * 16 * esize;
                const char *odd = vrow[step * 32 + 2 * i + 1] + c * 16 * esize;
                if (j->fp8) {  /* both tokens' 16 bytes widened at once */
                    const __m256i eo = _mm256_inserti128_si256(
                        _mm256_castsi128_si256(_mm_loadu_si128((const void *)even)), _mm_loadu_si128((const void *)odd), 1);
                    _mm512_store_si512(tile + i * 16, _mm512_permutexvar_epi16(interleave_halves, fp8x32_to_bf16(eo)));
                    continue;
                }
                const __m512i e = _mm512_castsi256_si512(_mm256_loadu_si256((const void *)even));
                const __m512i o = _mm512_castsi256_si512(_mm256_loadu_si256((const void *)odd));
                _mm512_store_si512(tile + i * 16, _mm512_permutex2var_epi16(e, interleave, o));
            }
        }
}

/* Row groups g and g + 1's scores for the block's tokens [32 step, 32 step + 32) into out[0] and out[1]: tiles
 * 0-3 the sums (group, 16-token half), 4-5 a 32-element slice of each group's queries, 6-7 of each half's keys:
 * each tile loaded serves two products. */
CHUNK_FN void chunk_scores(struct chunk_scratch *s, float (*out)[16 * CHUNK_KV], int64_t g, int64_t step) {
    const uint16_t *q0 = s->qrows + g * 16 * CHUNK_D, *q1 = q0 + 16 * CHUNK_D;
    const uint32_t *k = s->kp + 2 * step * (CHUNK_D / 32) * 256;  /* tile (16-token half i, slice c): 4 i + c */
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
#define CHUNK_SLICE(c)                         \
    _tile_loadd(4, q0 + 32 * (c), CHUNK_D * 2); \
    _tile_loadd(6, k + (c) * 256, 64);         \
    _tile_dpbf16ps(0, 4, 6);                   \
    _tile_loadd(5, q1 + 32 * (c), CHUNK_D * 2); \
    _tile_dpbf16ps(2, 5, 6);                   \
    _tile_loadd(7, k + (4 + (c)) * 256, 64);   \
    _tile_dpbf16ps(1, 4, 7);                   \
    _tile_dpbf16ps(3, 5, 7);
    CHUNK_SLICE(0)
    CHUNK_SLICE(1)
    CHUNK_SLICE(2)
    CHUNK_SLICE(3)
#undef CHUNK_SLICE
    _tile_stored(0, out[0] + step * 32, CHUNK_KV * 4);
    _tile_stored(1, out[0] + step * 32 + 16, CHUNK_KV * 4);
    _tile_stored(2, out[1] + step * 32, CHUNK_KV * 4);
    _tile_stored(3, out[1] + step * 32 + 16, CHUNK_KV * 4);
}

/* One row's softmax over the block at t0 (its first `tokens` scores, row r of scores [16][CHUNK_KV]): its weights,
 * bf16, into the row's first half (0 past its query's token; each 32 written after their scores and the next 32's
 * are read), its max and sum carried on, its outputs rescaled where the max grew. */
CHUNK_FN void chunk_softmax(const struct chunk_job *j, struct chunk_scratch *s, float *scores, int64_t row,
                            int64_t pos, int64_t t0, int64_t tokens) {
    const __m512 c = _mm512_set1_ps(j->c);
    const int64_t r = row % 16;
    int64_t seen = pos + 1 - t0;  /* tokens of the block this row sees */
    seen = seen < 0 ? 0 : seen > tokens ? tokens : seen;
    const float *sr = scores + r * CHUNK_KV;
    uint16_t *pr = (uint16_t *)(scores + r * CHUNK_KV);
    __m512 mx[4];  /* four chains of maxes: one would wait on each max's latency */
    for (int i = 0; i < 4; i++) mx[i] = _mm512_set1_ps(-FLT_MAX);
    int64_t t = 0;
    for (; t + 64 <= seen; t += 64)
        for (int i = 0; i < 4; i++) mx[i] = _mm512_max_ps(mx[i], _mm512_loadu_ps(sr + t + 16 * i));
    for (; t < seen; t += 16)
        mx[0] = _mm512_mask_max_ps(mx[0], chunk_lanes(seen - t), mx[0], _mm512_loadu_ps(sr + t));
    const float m_old = s->m[row];
    float m_new = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_max_ps(mx[0], mx[1]), _mm512_max_ps(mx[2], mx[3]))) * j->c;
    m_new = m_new > m_old ? m_new : m_old;
    const __m512 m = _mm512_set1_ps(m_new), unseen = _mm512_set1_ps(-1000.0f);  /* 2^-1000: 0 */
    __m512 sum = _mm512_setzero_ps();
    for (t = 0; t < tokens; t += 32) {  /* two vectors, rounded to bf16 in one instruction */
        __m512 x0 = _mm512_fmsub_ps(_mm512_loadu_ps(sr + t), c, m);
        __m512 x1 = _mm512_fmsub_ps(_mm512_loadu_ps(sr + t + 16), c, m);
        if (seen - t < 32) {
            x0 = _mm512_mask_blend_ps(chunk_lanes(seen - t), unseen, x0);
            x1 = _mm512_mask_blend_ps(chunk_lanes(seen - t - 16), unseen, x1);
        }
        const __m512 p0 = chunk_exp2(x0), p1 = chunk_exp2(x1);
        sum = _mm512_add_ps(sum, _mm512_add_ps(p0, p1));
        _mm512_storeu_si512(pr + t, (__m512i)_mm512_cvtne2ps_pbh(p1, p0));
    }
    if (m_new == m_old) {
        s->l[row] += _mm512_reduce_add_ps(sum);
        return;
    }
    const __m512 alpha = chunk_exp2(_mm512_set1_ps(m_old - m_new));
    s->l[row] = s->l[row] * _mm512_cvtss_f32(alpha) + _mm512_reduce_add_ps(sum);
    s->m[row] = m_new;
    float *o = s->o + row * CHUNK_D;
    for (int d = 0; d < CHUNK_D; d += 16) _mm512_store_ps(o + d, _mm512_mul_ps(_mm512_load_ps(o + d), alpha));
}

/* Row groups g and g + 1's outputs += their weights (w, bf16, [2][16][tokens] in rows of CHUNK_KV floats) times the
 * block's values, a quarter of the outputs' 128 elements at a time: tiles 0-3 the outputs (group, 16 elements),
 * 4-5 each group's weights of 32 tokens, 6-7 each 16 elements' values: each tile loaded serves two products. */
CHUNK_FN void chunk_values(struct chunk_scratch *s, float (*w)[16 * CHUNK_KV], int64_t g, int64_t tokens) {
    float *o0 = s->o + g * 16 * CHUNK_D, *o1 = o0 + 16 * CHUNK_D;
    const uint16_t *p0 = (const uint16_t *)w[0], *p1 = (const uint16_t *)w[1];
    for (int quarter = 0; quarter < 4; quarter++) {
        const int e = quarter * 32;
        _tile_loadd(0, o0 + e, CHUNK_D * 4);
        _tile_loadd(1, o0 + e + 16, CHUNK_D * 4);
        _tile_loadd(2, o1 + e, CHUNK_D * 4);
        _tile_loadd(3, o1 + e + 16, CHUNK_D * 4);
        for (int64_t step = 0; step < tokens / 32; step++) {
            const uint32_t *v = s->vp + (step * (CHUNK_D / 16) + quarter * 2) * 256;
            _tile_loadd(4, p0 + step * 32, CHUNK_KV * 4);
            _tile_loadd(6, v, 64);
            _tile_dpbf16ps(0, 4, 6);
            _tile_loadd(5, p1 + step * 32, CHUNK_KV * 4);
            _tile_dpbf16ps(2, 5, 6);
            _tile_loadd(7, v + 256, 64);
            _tile_dpbf16ps(1, 4, 7);
            _tile_dpbf16ps(3, 5, 7);
        }
        _tile_stored(0, o0 + e, CHUNK_D * 4);
        _tile_stored(1, o0 + e + 16, CHUNK_D * 4);
        _tile_stored(2, o1 + e, CHUNK_D * 4);
        _tile_stored(3, o1 + e + 16, CHUNK_D * 4);
    }
}

/* The tokens of the block at t0 (`left` of them) that row group g multiplies: up to its last query's, in steps of
 * 32; 0 where that query is before the block */
CHUNK_FN int64_t chunk_tokens(const int64_t *pos, int64_t rows, int64_t g, int64_t t0, int64_t left) {
    const int64_t last = pos[g * 16 + 15 < rows ? g * 16 + 15 : rows - 1];
    if (last < t0) return 0;
    const int64_t seen = last + 1 - t0 < left ? last + 1 - t0 : left;
    return (seen + 31) / 32 * 32;
}

/* Unit u: the KV head u % Hkv's rows of block u / Hkv of queries, the last blocks first (the most work). */
CHUNK_FN void chunk_unit(const struct chunk_job *j, int64_t u, struct chunk_scratch *s) {
    const int64_t h = u % j->Hkv, block = j->blocks_of_queries - 1 - u / j->Hkv;
    const int64_t q0 = block * j->queries_per_unit;
    const int64_t nq = j->n - q0 < j->queries_per_unit ? j->n - q0 : j->queries_per_unit;
    /* pairs of row groups (CHUNK_ROWS a multiple of 32): an odd last group's pair is padding rows */
    const int64_t rows = nq * j->G, groups = (rows + 31) / 32 * 2;
    int64_t pos[CHUNK_ROWS];  /* each row's query's token: it sees the tokens up to there (-1: a padding row) */
    for (int64_t row = 0; row < groups * 16; row++) {
        uint16_t *qr = s->qrows + row * CHUNK_D;
        s->m[row] = -FLT_MAX, s->l[row] = 0.0f;
        memset(s->o + row * CHUNK_D, 0, CHUNK_D * sizeof(float));
        if (row >= rows) {
            pos[row] = -1;
            memset(qr, 0, CHUNK_D * 2);
            continue;
        }
        const int64_t i = q0 + row / j->G, head = h * j->G + row % j->G;
        pos[row] = j->ctx - j->n + i;
        memcpy(qr, j->q + (i * j->Hq + head) * CHUNK_D, CHUNK_D * 2);
    }
    const int64_t end = pos[rows - 1] + 1;  /* the unit's last query sees this many tokens */
    for (int64_t t0 = 0; t0 < end; t0 += CHUNK_KV) {
        const int64_t left = end - t0 < CHUNK_KV ? end - t0 : CHUNK_KV;
        chunk_pack(j, s, h, t0, (left + 31) / 32 * 32, end);
        int64_t g = 0, tokens = 0;
        while (!(tokens = chunk_tokens(pos, rows, g + 1, t0, left))) g += 2;
        for (int64_t step = 0; step < tokens / 32; step++) chunk_scores(s, s->s[g / 2 % 2], g, step);
        for (; g < groups; g += 2) {  /* pairs of row groups; the next pair's scores between this pair's softmax rows */
            const int64_t next = g + 2 < groups ? chunk_tokens(pos, rows, g + 3, t0, left) : 0;
            float (*w)[16 * CHUNK_KV] = s->s[g / 2 % 2], (*nw)[16 * CHUNK_KV] = s->s[(g / 2 + 1) % 2];
            for (int64_t r = 0; r < 32; r++) {
                chunk_softmax(j, s, w[r / 16], g * 16 + r, pos[g * 16 + r], t0, tokens);
                if (r % 4 == 3 && r / 4 < next / 32) chunk_scores(s, nw, g + 2, r / 4);
            }
            chunk_values(s, w, g, tokens);
            tokens = next;
        }
    }
    for (int64_t row = 0; row < rows; row++) {
        const int64_t i = q0 + row / j->G, head = h * j->G + row % j->G;
        const float *o = s->o + row * CHUNK_D;
        const __m512 inv = _mm512_set1_ps(1.0f / s->l[row]);
        uint16_t *out = j->out + (i * j->Hq + head) * CHUNK_D;
        for (int d = 0; d < CHUNK_D; d += 16)
            _mm256_storeu_si256((void *)(out + d),
                                (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(_mm512_load_ps(o + d), inv)));
    }
}

/* The exported kernel: the last n tokens' queries q [n][Hq][128] of a sequence, causal over its first ctx cached
 * tokens (blocks `table` of caches [blocks][block_size][Hkv][128], block_size a multiple of 16) -> out
 * [n][Hq][128], all bf16 but fp8 e4m3 caches where kv_fp8. 0; -1 where its scratch could not be allocated; -2 for
 * shapes it does not take. */
__attribute__((target(ISA))) int chunk_attention_amx(const uint16_t *q, const void *kc, const void *vc, int kv_fp8,
                                                     const int64_t *table, int64_t ctx, int64_t n, int64_t Hq,
                                                     int64_t Hkv, int64_t D, int64_t block_size, float scale,
                                                     uint16_t *out, int threads) {
    const int64_t G = Hq / Hkv;
    if (D != CHUNK_D || G * Hkv != Hq || 16 % G != 0 || block_size % 16 != 0 || n < 1 || n > ctx) return -2;
    struct chunk_scratch *scratch = aligned_alloc(64, (size_t)threads * sizeof(struct chunk_scratch));
    if (!scratch) return -1;
    /* queries a unit: CHUNK_ROWS rows, or fewer where a short span would leave threads without a unit (whole row
     * groups, 16 / G queries each) */
    int64_t per_unit = n * Hkv / threads / (16 / G) * (16 / G);
    per_unit = per_unit > CHUNK_ROWS / G ? CHUNK_ROWS / G : per_unit < 16 / G ? 16 / G : per_unit;
    struct chunk_job j = {q, kc, vc, kv_fp8, table, ctx, n, Hq, Hkv, G, block_size, per_unit,
                          (n + per_unit - 1) / per_unit, scale * 1.4426950408889634f, out, scratch};
#pragma omp parallel num_threads(threads)
    {
        configure_tiles(16);
        struct chunk_scratch *s = scratch + omp_get_thread_num();
        memset(s->zeros, 0, sizeof s->zeros);
#pragma omp for schedule(dynamic)
        for (int64_t u = 0; u < j.blocks_of_queries * Hkv; u++) chunk_unit(&j, u, s);
        _tile_release();
    }
    free(scratch);
    return 0;
}
#undef CHUNK_FN
