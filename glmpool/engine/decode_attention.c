/* One decode step's attention on the CPU, for a batch whose keys and values live in a KV slab
 * (model.KVSlab): per sequence and head, rotate this step's query and key, store the key and value at
 * the sequence's position, and attend over its own positions 0..position.
 *
 * Why: in torch that is ~20 calls a layer (rotary, scatter into the slab, padded batched GEMVs,
 * softmax), ~15% of a batch-16 decode step and ~6% of a lone one on the medium model, most of it
 * per-call overhead and GEMVs that read the cache at half the memory's speed. Here each (sequence, head)
 * is one pass over its keys and values.
 *
 * Batching must not change a sequence's results: every (sequence, head) is computed start to end by one
 * thread in a fixed order that depends on nothing else (not the batch, not the thread count, not the
 * vector width: the AVX-512, AVX2 and plain C variants give the same bits). Sums over a head's
 * dimensions run in 16 lanes (lane i takes dimensions i, i + 16, ...), then the lanes are added in a
 * fixed tree; sums over positions run in position order. Compiled with -ffp-contract=off: the rotation rounds its products
 * and its sum apart, as torch's `x * cos + swapped * sin` does, and only explicit fmaf fuses.
 */
#include <math.h>
#include <stdint.h>

#define LANES 16  /* partial sums of a dot product over a head's dimensions */
#define CHUNK 64   /* dimensions of the context accumulated at a time (in registers) */

/* a . b over d floats (d a multiple of LANES), in plain C: lane i sums dimensions i, i + 16, ... by
 * fused multiply-adds, then lanes i and i + 8 are added, then i and i + 4, i and i + 2, 0 and 1. */
static inline __attribute__((always_inline)) float dot_c(const float *a, const float *b, int64_t d) {
    float lane[LANES] = {0};
    for (int64_t k = 0; k < d; k += LANES)
        for (int i = 0; i < LANES; i++)
            lane[i] = fmaf(a[k + i], b[k + i], lane[i]);
    for (int width = LANES / 2; width > 0; width /= 2)
        for (int i = 0; i < width; i++)
            lane[i] += lane[i + width];
    return lane[0];
}

/* context[e] += p * v[e] for e < d, one fused multiply-add each. */
static inline __attribute__((always_inline)) void axpy_c(float p, const float *v, float *context, int64_t d) {
    for (int64_t e = 0; e < d; e++)
        context[e] = fmaf(p, v[e], context[e]);
}

/* x [d] rotated by 1 or 2 parts (2D positions: position, then block position), each part's halves
 * swapped against the signed sine: out = x * cos + swapped(x) * sin, as model.rotate computes it. */
static inline __attribute__((always_inline)) void rotate(const float *x, const float *cos_, const float *sin_,
                                                         float *out, int64_t d, int parts) {
    int64_t part = d / parts, half = part / 2;
    for (int64_t e = 0; e < d; e++) {
        int64_t partner = e % part < half ? e + half : e - half;
        float straight = x[e] * cos_[e], swapped = x[partner] * sin_[e];
        out[e] = straight + swapped;
    }
}

/* One (sequence, head), see glmpool_decode_attention; DOT and AXPY_ALL are the vector width's own. */
#define DEFINE_ATTEND_HEAD(NAME, ATTRIBUTES, DOT, AXPY_ALL)                                                  \
ATTRIBUTES static void NAME(const float *qkv, const float *cos_, const float *sin_, float *keys, float *values, \
                            int64_t position, float *scores, float *context, int64_t d, int parts,          \
                            float query_divisor, float scale) {                                             \
    float query[d];                                                                                          \
    rotate(qkv, cos_, sin_, query, d, parts);                                                                \
    for (int64_t e = 0; e < d; e++)                                                                          \
        query[e] /= query_divisor;                                                                           \
    rotate(qkv + d, cos_, sin_, keys + position * d, d, parts);                                              \
    for (int64_t e = 0; e < d; e++)                                                                          \
        values[position * d + e] = qkv[2 * d + e];                                                           \
    float highest = -INFINITY;                                                                               \
    for (int64_t j = 0; j <= position; j++) {                                                                \
        scores[j] = DOT(query, keys + j * d, d) * scale;                                                     \
        highest = scores[j] > highest ? scores[j] : highest;                                                 \
    }                                                                                                        \
    float total = 0.0f;                                                                                      \
    for (int64_t j = 0; j <= position; j++) {                                                                \
        scores[j] = expf(scores[j] - highest);                                                               \
        total += scores[j];                                                                                  \
    }                                                                                                        \
    AXPY_ALL;                                                                                                \
    for (int64_t e = 0; e < d; e++)                                                                          \
        context[e] /= total;                                                                                 \
}

DEFINE_ATTEND_HEAD(attend_head_c, , dot_c, for (int64_t e = 0; e < d; e++) context[e] = 0.0f;
                   for (int64_t j = 0; j <= position; j++) axpy_c(scores[j], values + j * d, context, d))

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>

/* The last three steps of dot_c's lane tree, from lanes 0-7 holding lane[i] + lane[i + 8]. */
__attribute__((target("avx2,fma")))
static inline float add_8_lanes(__m256 s8) {
    __m128 s4 = _mm_add_ps(_mm256_castps256_ps128(s8), _mm256_extractf128_ps(s8, 1));
    __m128 s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
    return _mm_cvtss_f32(_mm_add_ss(s2, _mm_shuffle_ps(s2, s2, 1)));
}

/* dot_c with one 16-lane register. */
__attribute__((target("avx512f,fma")))
static inline float dot_avx512(const float *a, const float *b, int64_t d) {
    __m512 lane = _mm512_setzero_ps();
    for (int64_t k = 0; k < d; k += LANES)
        lane = _mm512_fmadd_ps(_mm512_loadu_ps(a + k), _mm512_loadu_ps(b + k), lane);
    __m256 high = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(lane), 1));
    return add_8_lanes(_mm256_add_ps(_mm512_castps512_ps256(lane), high));
}

/* dot_c with two 8-lane registers (lanes 0-7 and 8-15). */
__attribute__((target("avx2,fma")))
static inline float dot_avx2(const float *a, const float *b, int64_t d) {
    __m256 low = _mm256_setzero_ps(), high = _mm256_setzero_ps();
    for (int64_t k = 0; k < d; k += LANES) {
        low = _mm256_fmadd_ps(_mm256_loadu_ps(a + k), _mm256_loadu_ps(b + k), low);
        high = _mm256_fmadd_ps(_mm256_loadu_ps(a + k + 8), _mm256_loadu_ps(b + k + 8), high);
    }
    return add_8_lanes(_mm256_add_ps(low, high));
}

/* context = sum over positions j of p[j] * values[j], axpy_c's fused multiply-adds in the same order,
 * CHUNK dimensions at a time held in registers (VECTORS registers of WIDTH floats). */
#define AXPY_ALL_VECTOR(TYPE, WIDTH, VECTORS, ZERO, LOAD, STORE, FMA, SET1)                                  \
    for (int64_t e0 = 0; e0 < d; e0 += CHUNK) {                                                              \
        int live = (int)((d - e0 < CHUNK ? d - e0 : CHUNK) / WIDTH);                                         \
        TYPE acc[VECTORS];                                                                                   \
        for (int i = 0; i < VECTORS; i++) acc[i] = ZERO();                                                   \
        for (int64_t j = 0; j <= position; j++) {                                                            \
            TYPE p = SET1(scores[j]);                                                                        \
            const float *v = values + j * d + e0;                                                            \
            for (int i = 0; i < VECTORS; i++) if (i < live) acc[i] = FMA(p, LOAD(v + WIDTH * i), acc[i]);    \
        }                                                                                                    \
        for (int i = 0; i < live; i++) STORE(context + e0 + WIDTH * i, acc[i]);                             \
    }

DEFINE_ATTEND_HEAD(attend_head_avx512, __attribute__((target("avx512f,fma"))), dot_avx512,
                   AXPY_ALL_VECTOR(__m512, 16, 4, _mm512_setzero_ps, _mm512_loadu_ps, _mm512_storeu_ps,
                                   _mm512_fmadd_ps, _mm512_set1_ps))

DEFINE_ATTEND_HEAD(attend_head_avx2, __attribute__((target("avx2,fma"))), dot_avx2,
                   AXPY_ALL_VECTOR(__m256, 8, 8, _mm256_setzero_ps, _mm256_loadu_ps, _mm256_storeu_ps,
                                   _mm256_fmadd_ps, _mm256_set1_ps))
#endif

/* qkv [batch, heads, 3, d]: this step's projected query, key and value of each sequence and head (the
 * layout of THUDM's query_key_value rows); cos_, sin_ [batch, d]: the rotary tables at each sequence's
 * position (model.rotary_tables; sin signed); slab: one layer [2, slots, heads, capacity, d], sequence b
 * in slot b; positions [batch]: where b's new key and value go, b attending over 0..position; scores
 * [batch * heads, score_stride >= max position + 1]: scratch; context [batch, heads, d]: the output.
 * The query is divided by query_divisor after rotation, the scores multiplied by scale (THUDM's
 * sqrt(d) * (layer + 1) and layer + 1). isa: 512 or 256, as glmpool_isa() says; any other: plain C. */
void glmpool_decode_attention(const float *qkv, const float *cos_, const float *sin_, float *slab,
                              const int64_t *positions, float *scores, float *context, int64_t batch,
                              int64_t heads, int64_t d, int64_t slots, int64_t capacity, int64_t score_stride,
                              int parts, float query_divisor, float scale, int isa) {
    void (*attend_head)(const float *, const float *, const float *, float *, float *, int64_t, float *, float *,
                        int64_t, int, float, float) = attend_head_c;
#if defined(__x86_64__) && defined(__GNUC__)
    if (isa == 512)
        attend_head = attend_head_avx512;
    else if (isa == 256)
        attend_head = attend_head_avx2;
#endif
    #pragma omp parallel for schedule(static)
    for (int64_t task = 0; task < batch * heads; task++) {
        int64_t b = task / heads, h = task % heads;
        float *keys = slab + ((b * heads + h) * capacity) * d;
        float *values = slab + (((slots + b) * heads + h) * capacity) * d;
        attend_head(qkv + task * 3 * d, cos_ + b * d, sin_ + b * d, keys, values, positions[b],
                    scores + task * score_stride, context + task * d, d, parts, query_divisor, scale);
    }
}
