/* The decode attention kernel (decode_attention.c includes it once for each build): LANES query heads a vector
 * (GCC's vector types), NT tokens and DT value dims a step, the functions built for ISA and named F(name); with
 * BF16_DOT (AVX-512 BF16), bf16 caches go through attend_dot; with HALVES (AVX2), each query's step is
 * decode_attention_halves.h's. */

typedef float F(vec) __attribute__((vector_size(LANES * 4)));
typedef int32_t F(veci) __attribute__((vector_size(LANES * 4)));
#define vec F(vec)
#define veci F(veci)
#define INLINE static inline __attribute__((always_inline, target(ISA)))

/* splat, max and e^x for a vector type T of floats and Ti, its int32 twin: the LANES-wide vec, and (HALVES) its
 * 8-lane halves. e^x is for x <= 0 (scores minus their running maximum): 2^n * p(r) with r = x - n ln2 in
 * [-ln2/2, ln2/2]; its floor e^-87 ~ 1.6e-38 is the smallest normal float's order, and no -inf. */
#define VECTOR_MATH(T, Ti, splat, vmax, vexp)                                                                  \
    INLINE T splat(float f) { return (T){0} + f; }                                                             \
    INLINE T vmax(T a, T b) {                                                                                  \
        Ti mask = a > b;                                                                                       \
        return (T)(((Ti)a & mask) | ((Ti)b & ~mask));                                                          \
    }                                                                                                          \
    INLINE T vexp(T x) {                                                                                       \
        x = vmax(x, splat(-87.0f));                                                                            \
        const T magic = splat(12582912.0f); /* 1.5 * 2^23: adding it rounds to an integer */                  \
        T t = x * 1.44269504f + magic;                                                                         \
        T n = t - magic;                                                                                       \
        Ti ni = (Ti)t - (Ti)magic;                                                                             \
        T r = x - n * 0.693145752f - n * 1.42860677e-6f; /* ln2 in two parts */                                \
        T p = splat(1.0f / 720);                                                                               \
        p = p * r + 1.0f / 120;                                                                                \
        p = p * r + 1.0f / 24;                                                                                 \
        p = p * r + 1.0f / 6;                                                                                  \
        p = p * r + 0.5f;                                                                                      \
        p = p * r + 1.0f;                                                                                      \
        p = p * r + 1.0f;                                                                                      \
        return p * (T)((ni + 127) << 23);                                                                      \
    }
VECTOR_MATH(vec, veci, F(splat), F(vmax), F(vexp))

/* n rows of D elements of a cache of `kind` (KV_*), `stride` elements apart, widened into out [NT][D] (rows n..
 * zero) */
INLINE void F(widen_rows)(const void *src, int kind, int64_t stride, int64_t n, int64_t D, float *out) {
    for (int64_t i = 0; i < NT; i++) {
        float *o = out + i * D;
        if (i >= n) {
            memset(o, 0, D * sizeof(float));
        } else if (kind == KV_FP8) {
            const uint8_t *s = (const uint8_t *)src + i * stride;
            int64_t d = 0;
#if !HALVES
            for (; d + 16 <= D; d += 16) _mm512_storeu_ps(o + d, fp8x16_to_ps(s + d));
#endif
            for (; d < D; d += 8) _mm256_storeu_ps(o + d, fp8x8_to_ps(s + d));
        } else if (kind == KV_BF16) {
            const uint16_t *s = (const uint16_t *)src + i * stride;
            for (int64_t d = 0; d < D; d++) o[d] = from_bf16(s[d]);
        } else {
            memcpy(o, (const float *)src + i * stride, D * sizeof(float));
        }
    }
}

/* Tokens [u0, u1) (up to t1) of KV heads h.. h + pack - 1 into L2: a sequence's blocks lie anywhere in the cache,
 * where the hardware's prefetchers do not follow. */
INLINE void F(prefetch_tokens)(const char *kc, const char *vc, int64_t esize, const int64_t *table,
                               int64_t block_size, int64_t stride, int64_t h, int64_t D, int pack, int64_t u0,
                               int64_t u1, int64_t t1) {
    if (u1 > t1) u1 = t1;
    for (int64_t u = u0; u < u1; u++) {
        const int64_t row = (table[u / block_size] * block_size + u % block_size) * stride + h * D;
        for (int64_t byte = 0; byte < pack * D * esize; byte += 64) {
            __builtin_prefetch(kc + row * esize + byte, 0, 2);
            __builtin_prefetch(vc + row * esize + byte, 0, 2);
        }
    }
}

/* The step from token t of [t0, t1): its count of tokens (at most NT, all in t's block) and the element offset of
 * its first row in the caches (*row). Each step prefetches as many tokens PREFETCH_TOKENS ahead (the first also
 * the tokens up to there): spread so, rather than a block's worth at a block's start, long decodes ran 1.1-1.3x
 * quicker. */
INLINE int64_t F(step_at)(const char *kc, const char *vc, int64_t esize, const int64_t *table, int64_t block_size,
                          int64_t stride, int64_t h, int64_t D, int pack, int64_t t, int64_t t0, int64_t t1,
                          int64_t *row) {
    const int64_t off = t % block_size;
    int64_t n = t1 - t < NT ? t1 - t : NT;
    if (n > block_size - off) n = block_size - off;
    *row = (table[t / block_size] * block_size + off) * stride + h * D;
    const int64_t ahead = t + PREFETCH_TOKENS;
    if (t == t0) F(prefetch_tokens)(kc, vc, esize, table, block_size, stride, h, D, pack, t0, ahead, t1);
    F(prefetch_tokens)(kc, vc, esize, table, block_size, stride, h, D, pack, ahead, ahead + n, t1);
    return n;
}

/* A step's scores s [nt] (the first n real; nt: NT, or the AMX build's AMX_STEP) into the running max m and sum of
 * exps l -> the step's weights p [nt] (0 past n), and the factor that rescales the output so far to the new max
 * (applied with the step's values). */
INLINE vec F(softmax_step)(const vec *s, int64_t n, int nt, vec *m, vec *l, vec *p) {
    vec mt = *m;
    for (int i = 0; i < n; i++) mt = F(vmax)(mt, s[i]);
    const vec alpha = F(vexp)(*m - mt);
    *l *= alpha;
    for (int i = 0; i < nt; i++) {
        p[i] = i < n ? F(vexp)(s[i] - mt) : F(splat)(0.0f);
        *l += p[i];
    }
    *m = mt;
    return alpha;
}

/* Each of nq queries' partial at res + r * res_stride (running max, sum of exps, unnormalized output [D]) before its
 * first step: -FLT_MAX, 0 and zeros; the steps then keep them there. */
INLINE void F(start_queries)(int64_t nq, int64_t D, vec *res, int64_t res_stride) {
    for (int64_t r = 0; r < nq; r++) {
        res[r * res_stride] = F(splat)(-FLT_MAX);
        for (int64_t d = 1; d < D + 2; d++) res[r * res_stride + d] = F(splat)(0.0f);
    }
}

#if HALVES
#include "decode_attention_halves.h"
#else
/* One query's step: its scores for the step's NT tokens kf [NT][D] (the first nr seen), into its running max m,
 * sum of exps l and unnormalized output acc [D], with the weighted sum of the values vf [NT][D]. */
INLINE void F(query_step)(const vec *q, const float *kf, const float *vf, int64_t D, int64_t nr, vec *m, vec *l,
                          vec *acc) {
    vec s[NT];
    for (int i = 0; i < NT; i++) s[i] = F(splat)(0.0f);
    for (int64_t d = 0; d < D; d++)
        for (int i = 0; i < NT; i++) s[i] += q[d] * kf[i * D + d];
    vec p[NT];
    const vec alpha = F(softmax_step)(s, nr, NT, m, l, p);
    for (int64_t d = 0; d < D; d += DT) {
        vec a[DT];
        for (int j = 0; j < DT; j++) a[j] = acc[d + j] * alpha;
        for (int i = 0; i < NT; i++)
            for (int j = 0; j < DT; j++) a[j] += p[i] * vf[i * D + d + j];
        for (int j = 0; j < DT; j++) acc[d + j] = a[j];
    }
}
#endif

/* One unit: nq queries qT [D] of LANES heads each, q_stride vecs apart (pre-scaled; unused lanes 0), over tokens
 * [t0, t1) of KV head h, whose slots the block table gives; query r sees the tokens before first_limit + r (causal)
 * -> at res + r * res_stride, its running max, sum of exps and unnormalized output [D]. A step's keys and values
 * are read and widened once for all the queries. (Two queries taking each broadcast key or value element together
 * measured no quicker: the products, not the loads, bound a step.) */
INLINE void F(attend)(const vec *qT, int64_t q_stride, int64_t nq, int64_t first_limit, const void *kc,
                      const void *vc, int kind, const int64_t *table, int64_t block_size, int64_t Hkv, int64_t h,
                      int64_t D, int64_t t0, int64_t t1, vec *res, int64_t res_stride) {
    float kf[NT * MAX_D] __attribute__((aligned(64))), vf[NT * MAX_D] __attribute__((aligned(64)));
    const int64_t stride = Hkv * D;  /* elements from one token's vector to the next's */
    const int64_t esize = KV_ESIZE(kind);
    F(start_queries)(nq, D, res, res_stride);
    for (int64_t t = t0; t < t1;) {
        int64_t row;
        const int64_t n = F(step_at)(kc, vc, esize, table, block_size, stride, h, D, 1, t, t0, t1, &row);
        F(widen_rows)((const char *)kc + row * esize, kind, stride, n, D, kf);
        F(widen_rows)((const char *)vc + row * esize, kind, stride, n, D, vf);
        for (int64_t r = 0; r < nq; r++) {
            const int64_t nr = first_limit + r - t < n ? first_limit + r - t : n;  /* tokens query r sees */
            vec *mla = res + r * res_stride;  /* m, l, acc [D] */
            if (nr > 0) F(query_step)(qT + r * q_stride, kf, vf, D, nr, mla, mla + 1, mla + 2);
        }
        t += n;
    }
}

#if BF16_DOT
#include "decode_attention_dot.h"
#endif
#if AMX
#include "decode_attention_amx.h"
#endif


/* One batch: each sequence b's queries are rows query_starts[b].. query_starts[b + 1] of q [R, Hq, D] and out
 * [R, Hq, D] in the caches' type, the last tokens of its context: its block_tables [B, width] row, context_lens[b]
 * tokens long (its queries' own included), query i of n seeing the first context_lens[b] - n + 1 + i (causal). A
 * decode is one query. Hq = Hkv * G, each KV head's G query heads side by side. Each sequence's context is cut into
 * `splits` parts, units of work of their own. */
struct F(batch) {
    const void *q, *kc, *vc;
    int bf16;  /* q and out are bf16 (else fp32) */
    int kind;  /* the caches' KV_* */
    int paired;  /* units go through attend_dot or attend_amx, whose queries are bf16 pairs */
    const int64_t *block_tables, *context_lens, *query_starts;
    int64_t width, Hq, Hkv, D, block_size, splits, G, chunks;
    int64_t pack, lk, Hu;  /* KV heads a vector holds (attend_dot), lanes each of them takes, KV units (Hkv / pack) */
    float scale;
    void *out;
    vec *queries;  /* [R, Hu, chunks][D]: each row part's query, as attend or attend_dot takes it */
    float *amx_out;  /* AMX: each thread's [max_nq][LANES][D], attend_amx's outputs (AMX_OUT_SKEW on) */
    int64_t max_nq;  /* the most queries a sequence brings */
    int64_t parts;  /* units of work before the splits: B * Hu * chunks */
};

/* The query head (of a row's Hq) that lane g of KV unit hu's chunk c holds, or -1 for none: with pack 2, lane g
 * is KV head 2 hu + g % 2's query head g / 2. */
INLINE int64_t F(lane_head)(const struct F(batch) *j, int64_t hu, int64_t c, int64_t g) {
    const int64_t kv = hu * j->pack + g % j->pack, qh = c * j->lk + g / j->pack;
    return qh < j->G ? kv * j->G + qh : -1;
}

/* Row part p (query row, KV unit, chunk of LANES query heads) -> its query in j->queries, lanes of heads: for
 * attend_dot, D / 2 pairs (unscaled); for attend, D elements times the scale. */
INLINE void F(load_query)(const struct F(batch) *j, int64_t p) {
    const int64_t D = j->D, row = p / (j->Hu * j->chunks), hu = p / j->chunks % j->Hu, c = p % j->chunks;
    vec *qv = j->queries + p * D;
#if BF16_DOT
    if (j->paired) {
        uint32_t *pairs = (uint32_t *)qv;  /* [D / 2][LANES] */
        for (int64_t g = 0; g < LANES; g++) {
            const int64_t head = F(lane_head)(j, hu, c, g);
            for (int64_t d2 = 0; d2 < D / 2; d2++) {
                uint32_t pair = 0;
                if (head >= 0) memcpy(&pair, (const uint16_t *)j->q + (row * j->Hq + head) * D + 2 * d2, 4);
                pairs[d2 * LANES + g] = pair;
            }
        }
        return;
    }
#endif
    float *lanes = (float *)qv;  /* [D][LANES] */
    for (int64_t d = 0; d < D; d++) qv[d] = F(splat)(0.0f);
    for (int64_t g = 0; g < LANES; g++) {
        const int64_t head = F(lane_head)(j, hu, c, g);
        if (head < 0) continue;
        for (int64_t d = 0; d < D; d++) {
            const int64_t at = (row * j->Hq + head) * D + d;
            float x = j->bf16 ? from_bf16(((const uint16_t *)j->q)[at]) : ((const float *)j->q)[at];
            lanes[d * LANES + g] = x * j->scale;
        }
    }
}

/* Unit u (split, then sequence, KV unit, chunk of LANES query heads) -> the partial [D + 2] (m, l, acc [D]) of each
 * of the sequence's queries for this split, at ((row * Hu + hu) * chunks + c) * splits + split. Units go split by
 * split, so the threads read a sequence's KV heads over the same tokens at once: a token's heads lie side by side
 * in its row, and the lines of the other heads that the hardware fetches with one head's are then read by the
 * other threads, not fetched again later (a 32K-token decode from memory 1.13-1.20x quicker than head by head). */
INLINE void F(run_unit)(const struct F(batch) *j, int64_t u, vec *partial) {
    const int64_t D = j->D, part = u % j->parts, split = u / j->parts;
    const int64_t b = part / (j->Hu * j->chunks), hu = part / j->chunks % j->Hu, c = part % j->chunks;
    const int64_t h = hu * j->pack;  /* the first KV head */
    const int64_t row0 = j->query_starts[b], nq = j->query_starts[b + 1] - row0;
    const int64_t ctx = j->context_lens[b], blocks = (ctx + j->block_size - 1) / j->block_size;
    const int64_t per = (blocks + j->splits - 1) / j->splits * j->block_size;  /* tokens per split, whole blocks */
    const int64_t t0 = split * per, t1 = t0 + per < ctx ? t0 + per : ctx;
    const int64_t row_part = (row0 * j->Hu + hu) * j->chunks + c;  /* the first query's row part */
    const int64_t res_stride = j->Hu * j->chunks * j->splits * (D + 2);  /* vecs from a query's partial on */
    vec *res = partial + (row_part * j->splits + split) * (D + 2);
    const vec *q = j->queries + row_part * D;
    const int64_t q_stride = j->Hu * j->chunks * D;  /* vecs from a query to the next */
    const int64_t first_limit = ctx - nq + 1;
    const int64_t *table = j->block_tables + b * j->width;
#if AMX
    if (j->paired && F(amx_takes)(j->block_size, D)) {
        float *out = j->amx_out + AMX_OUT_SKEW + omp_get_thread_num() * (j->max_nq * LANES * D + AMX_OUT_PAD);
        F(attend_amx)((const uint32_t *)q, q_stride, nq, first_limit, j->scale, j->kc, j->vc, j->kind == KV_FP8,
                      table, j->block_size, j->Hkv, h, D, t0, t1, res, res_stride, out);
        return;
    }
#endif
#if BF16_DOT
    if (j->paired) {
        if (j->pack == 2)
            F(attend_dot)(2, (const __m512i *)q, q_stride, nq, first_limit, j->scale, j->kc, j->vc, table,
                          j->block_size, j->Hkv, h, D, t0, t1, res, res_stride);
        else
            F(attend_dot)(1, (const __m512i *)q, q_stride, nq, first_limit, j->scale, j->kc, j->vc, table,
                          j->block_size, j->Hkv, h, D, t0, t1, res, res_stride);
        return;
    }
#endif
    F(attend)(q, q_stride, nq, first_limit, j->kc, j->vc, j->kind, table, j->block_size, j->Hkv, h, D, t0, t1, res,
              res_stride);
}

/* The splits of row part p (query row, KV unit, chunk of query heads) merged into out. */
INLINE void F(merge_part)(const struct F(batch) *j, int64_t part, const vec *partial) {
    const int64_t D = j->D, S = j->splits;
    const int64_t row = part / (j->Hu * j->chunks), hu = part / j->chunks % j->Hu, c = part % j->chunks;
    const vec *res = partial + part * S * (D + 2);
    vec m = res[0];
    for (int64_t s = 1; s < S; s++) m = F(vmax)(m, res[s * (D + 2)]);
    vec w[MAX_SPLITS], l = F(splat)(0.0f);
    for (int64_t s = 0; s < S; s++) {
        w[s] = F(vexp)(res[s * (D + 2)] - m);
        l += w[s] * res[s * (D + 2) + 1];
    }
    const vec inv = 1.0f / l;
    int64_t heads[LANES];
    for (int64_t g = 0; g < LANES; g++) heads[g] = F(lane_head)(j, hu, c, g);
    for (int64_t d = 0; d < D; d++) {
        vec o = F(splat)(0.0f);
        for (int64_t s = 0; s < S; s++) o += w[s] * res[s * (D + 2) + 2 + d];
        o *= inv;
        for (int64_t g = 0; g < LANES; g++) {
            if (heads[g] < 0) continue;
            const int64_t at = (row * j->Hq + heads[g]) * D + d;
            if (j->bf16) ((uint16_t *)j->out)[at] = to_bf16(o[g]);
            else ((float *)j->out)[at] = o[g];
        }
    }
}

/* The exported kernel, F(paged_attention): q and out bf16 (else fp32), the caches fp8 e4m3 where kv_fp8 (else q's
 * type). 0, -1 where its scratch could not be allocated, -2 where a sequence has more than MAX_SPAN queries or
 * fewer than 1, or more queries than tokens. */
__attribute__((target(ISA))) int F(paged_attention)(const void *q, const void *kc, const void *vc, int bf16,
                                                    int kv_fp8, const int64_t *block_tables, int64_t width,
                                                    const int64_t *context_lens, const int64_t *query_starts,
                                                    int64_t B, int64_t Hq, int64_t Hkv, int64_t D, int64_t block_size,
                                                    float scale, int64_t splits, void *out, int threads) {
    int64_t max_nq = 1;
    for (int64_t b = 0; b < B; b++) {
        const int64_t nq = query_starts[b + 1] - query_starts[b];
        if (nq < 1 || nq > MAX_SPAN || nq > context_lens[b]) return -2;
        if (nq > max_nq) max_nq = nq;
    }
    const int kind = kv_fp8 ? KV_FP8 : bf16 ? KV_BF16 : KV_FP32;
    /* bf16 queries as pairs: attend_dot's for bf16 caches, attend_amx's for both of its kinds */
#if AMX
    const int paired = bf16 && (kind == KV_BF16 || F(amx_takes)(block_size, D));
#else
    const int paired = BF16_DOT && bf16 && kind == KV_BF16;
#endif
    const int64_t G = Hq / Hkv, pack = PACKS(paired, G, Hkv);
    const int64_t lk = LANES / pack, Hu = Hkv / pack, chunks = (G + lk - 1) / lk, parts = B * Hu * chunks;
    const int64_t row_parts = query_starts[B] * Hu * chunks;
    vec *partial = aligned_alloc(64, (size_t)(row_parts * splits * (D + 2)) * sizeof(vec));
    vec *queries = aligned_alloc(64, (size_t)(row_parts * D) * sizeof(vec));
#if AMX
    float *amx_out = aligned_alloc(64, (size_t)(threads * (max_nq * LANES * D + AMX_OUT_PAD)) * sizeof(float));
#else
    float *amx_out = NULL;
#endif
    if (!partial || !queries || (AMX && !amx_out)) {
        free(partial);
        free(queries);
        free(amx_out);
        return -1;
    }
    struct F(batch) j = {q, kc, vc, bf16, kind, paired, block_tables, context_lens, query_starts, width, Hq, Hkv, D,
                         block_size, splits, G, chunks, pack, lk, Hu, scale, out, queries, amx_out, max_nq, parts};
#pragma omp parallel num_threads(threads)
    {
#if AMX
        configure_tiles(16);
#endif
#pragma omp for schedule(static)
        for (int64_t p = 0; p < row_parts; p++) F(load_query)(&j, p);
#pragma omp for schedule(dynamic)
        for (int64_t u = 0; u < parts * splits; u++) F(run_unit)(&j, u, partial);
#pragma omp for schedule(static)
        for (int64_t p = 0; p < row_parts; p++) F(merge_part)(&j, p, partial);
#if AMX
        _tile_release();
#endif
    }
    free(partial);
    free(queries);
    free(amx_out);
    return 0;
}

#undef vec
#undef veci
#undef INLINE
#undef VECTOR_MATH
