/* THUDM's int8 and int4 matrices, as stored, times activations quantized to int8 on the fly, in integers:
 * y[m, n] = scale[n] * sum over blocks b of xs[m, b] * dot(xq[m, b], q[n, b]) (+ bias[n]).
 *
 * Why: widening every weight to fp32 costs ~18 vector instructions per 32 int4 weights; multiplying bytes
 * (maddubs: unsigned x signed bytes into pairs of int16, then madd into int32) costs ~6, and decoding is
 * then bound by memory again. The activations are quantized per block of 32 inputs (ggml's q8_0 scheme):
 * xs = max|x| / 127, xq = x * (127 / max|x|) rounded to nearest even.
 *
 * Batch invariance by construction: a block's dot product is an integer, exact in any order; each output
 * adds its blocks' xs * dot in block order, in fp32 (a multiply and an add, never fused, so that torch can
 * reproduce the bits), then multiplies by its row scale and adds the bias. Nothing depends on the other
 * rows, their number, the threads (OpenMP over blocks of 8 outputs) or the tiling.
 *
 * Bounds: a block's |dot| is at most 32 * 127 * 128 (int8) or 32 * 127 * 15 + 8 * 32 * 127 (int4), far
 * inside int32 and exact in fp32 (< 2^24); no integer sum spans blocks, so any K is safe. maddubs adds two
 * products into int16: 2 * 128 * 127 = 32512 for int8 (the sign trick below keeps |w| <= 128 unsigned),
 * 2 * 15 * 127 for int4 (and two of those added before madd), so it never saturates.
 *
 * int4 (THUDM: byte j of a row holds column 2j in the high nibble, 2j + 1 in the low) needs no re-layout:
 * 32 bytes (64 columns, blocks b and b + 1) give 32 low nibbles (odd columns) and 32 high ones (even
 * columns), each with block b in their first 16 bytes; the activations of each 64 columns are stored in
 * that order instead (odd columns of b, of b + 1, even columns of b, of b + 1). The nibbles are read
 * unsigned (q + 8: each nibble's sign bit flipped) and 8 * sum(xq) of the block is subtracted.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>

#define QBLOCK 32  /* inputs per activation scale */
#define OUTS 8     /* outputs per tile: one fp32 vector of sums */
#define ROW_GROUP 16  /* rows per pass over a tile's weights: their activations stay in L1/L2 */

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>

/* One row x[in] -> xq[in] (for int4 in the nibble order above), xs[in / 32], corr[in / 32] = 8 * sum(xq)
 * of each block. A block holding inf or NaN gets xs = NaN, so the outputs become NaN as in fp32. */
__attribute__((target("avx2,fma")))
static void quantize_row(const float *x, int8_t *xq, float *xs, int32_t *corr, int64_t in, int int4) {
    const __m256 sign = _mm256_set1_ps(-0.0f);
    for (int64_t b = 0; b < in / QBLOCK; b++) {
        const float *xb = x + b * QBLOCK;
        __m256 v[4], amax = _mm256_setzero_ps(), bad = _mm256_setzero_ps();
        for (int i = 0; i < 4; i++) {
            v[i] = _mm256_loadu_ps(xb + 8 * i);
            amax = _mm256_max_ps(amax, _mm256_andnot_ps(sign, v[i]));
            bad = _mm256_add_ps(bad, _mm256_sub_ps(v[i], v[i]));  /* 0, or NaN for inf and NaN */
        }
        __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(amax), _mm256_extractf128_ps(amax, 1));
        m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
        float top = _mm_cvtss_f32(_mm_max_ss(m4, _mm_shuffle_ps(m4, m4, 1)));
        __m128 b4 = _mm_add_ps(_mm256_castps256_ps128(bad), _mm256_extractf128_ps(bad, 1));
        int finite = _mm_movemask_ps(_mm_cmpunord_ps(b4, b4)) == 0;
        float inverse = top > 0 ? 127.0f / top : 0.0f;
        if (isinf(inverse)) inverse = 0.0f;  /* a block below 127 / FLT_MAX: zeros, not inf * x */
        xs[b] = finite ? top / 127.0f : NAN;
        __m256 scale = _mm256_set1_ps(finite ? inverse : 0.0f);
        __m256i q[4];  /* rounded to nearest even (the default rounding mode), |q| <= 127 */
        for (int i = 0; i < 4; i++) q[i] = _mm256_cvtps_epi32(_mm256_mul_ps(v[i], scale));
        int8_t tmp[QBLOCK];
        __m256i p = _mm256_packs_epi16(_mm256_packs_epi32(q[0], q[1]), _mm256_packs_epi32(q[2], q[3]));
        /* packs interleaves 128-bit lanes: put the 32 bytes back in input order */
        p = _mm256_permutevar8x32_epi32(p, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
        _mm256_storeu_si256((__m256i *)tmp, p);
        int32_t sum = 0;
        for (int i = 0; i < QBLOCK; i++) sum += tmp[i];
        corr[b] = 8 * sum;
        if (!int4) {
            memcpy(xq + b * QBLOCK, tmp, QBLOCK);
            continue;
        }
        /* within the 64 columns of blocks b & ~1 and b | 1: odd columns at 16 * (b & 1), even ones 32 later */
        int8_t *step = xq + (b & ~(int64_t)1) * QBLOCK + 16 * (b & 1);
        for (int i = 0; i < 16; i++) {
            step[i] = tmp[2 * i + 1];
            step[32 + i] = tmp[2 * i];
        }
    }
}

/* dot products of one block (int8) or two (int4) of OUTS weight rows with a row's activations, as int32
 * vectors of partial sums: int8 lanes all of the block; int4 lanes 0-3 block b, 4-7 block b + 1. */
__attribute__((target("avx2,fma"), always_inline))
static inline __m256i dot_int8(const int8_t *w, __m256i xq) {
    __m256i wv = _mm256_loadu_si256((const __m256i *)w);
    /* maddubs takes one unsigned operand: |w| (-128 reads as 128), and x takes w's sign */
    __m256i pairs = _mm256_maddubs_epi16(_mm256_sign_epi8(wv, wv), _mm256_sign_epi8(xq, wv));
    return _mm256_madd_epi16(pairs, _mm256_set1_epi16(1));
}

__attribute__((target("avx2,fma"), always_inline))
static inline __m256i dot_nibbles(__m256i low, __m256i high, __m256i xlow, __m256i xhigh) {
    __m256i pairs = _mm256_add_epi16(_mm256_maddubs_epi16(low, xlow), _mm256_maddubs_epi16(high, xhigh));
    return _mm256_madd_epi16(pairs, _mm256_set1_epi16(1));
}

/* OUTS vectors of 8 partial sums -> one vector of the OUTS totals (int8: one block). */
__attribute__((target("avx2,fma"), always_inline))
static inline __m256i totals_of(const __m256i *v) {
    __m256i a = _mm256_hadd_epi32(_mm256_hadd_epi32(v[0], v[1]), _mm256_hadd_epi32(v[2], v[3]));
    __m256i b = _mm256_hadd_epi32(_mm256_hadd_epi32(v[4], v[5]), _mm256_hadd_epi32(v[6], v[7]));
    return _mm256_add_epi32(_mm256_permute2x128_si256(a, b, 0x20), _mm256_permute2x128_si256(a, b, 0x31));
}

/* int4: each vector's lanes 0-3 sum block b, 4-7 block b + 1 -> the OUTS totals of each block. */
__attribute__((target("avx2,fma"), always_inline))
static inline void totals_of_pair(const __m256i *v, __m256i *first, __m256i *second) {
    __m256i a = _mm256_hadd_epi32(_mm256_hadd_epi32(v[0], v[1]), _mm256_hadd_epi32(v[2], v[3]));
    __m256i b = _mm256_hadd_epi32(_mm256_hadd_epi32(v[4], v[5]), _mm256_hadd_epi32(v[6], v[7]));
    *first = _mm256_permute2x128_si256(a, b, 0x20);
    *second = _mm256_permute2x128_si256(a, b, 0x31);
}

/* acc += xs * float(dot), per output, not fused (see the top) */
__attribute__((target("avx2,fma"), always_inline))
static inline __m256 add_block(__m256 acc, __m256i dot, float xs) {
    return _mm256_add_ps(acc, _mm256_mul_ps(_mm256_set1_ps(xs), _mm256_cvtepi32_ps(dot)));
}

/* One tile: OUTS weight rows (w[r] their starts; a tile past the matrix's end repeats its last row) times
 * `rows` quantized rows -> acc[rows] (8 outputs each). Blocks outer, rows inner: each weight block is loaded
 * (int4: unpacked) once for all the rows. `rows` is a constant 1 for a lone row (tile_*_row below). */
__attribute__((target("avx2,fma"), always_inline))
static inline void tile_int8(const int8_t *const *w, const int8_t *xq, const float *xs, __m256 *acc, int rows,
                             int64_t in, const char *ahead) {
    int64_t blocks = in / QBLOCK;
    for (int m = 0; m < rows; m++) acc[m] = _mm256_setzero_ps();
    for (int64_t b = 0; b < blocks; b++) {
        /* 8 rows of 1-4 KB are too short for the hardware prefetcher to follow at once: fetch the next
         * tile (contiguous rows) at the rate this one is read */
        _mm_prefetch(ahead + b * OUTS * QBLOCK, _MM_HINT_T1);
        _mm_prefetch(ahead + b * OUTS * QBLOCK + 64, _MM_HINT_T1);
        _mm_prefetch(ahead + b * OUTS * QBLOCK + 128, _MM_HINT_T1);
        _mm_prefetch(ahead + b * OUTS * QBLOCK + 192, _MM_HINT_T1);
        for (int m = 0; m < rows; m++) {
            __m256i x = _mm256_loadu_si256((const __m256i *)(xq + m * in + b * QBLOCK)), v[OUTS];
            for (int r = 0; r < OUTS; r++) v[r] = dot_int8(w[r] + b * QBLOCK, x);
            acc[m] = add_block(acc[m], totals_of(v), xs[m * blocks + b]);
        }
    }
}

__attribute__((target("avx2,fma"), always_inline))
static inline void tile_int4(const uint8_t *const *w, const int8_t *xq, const float *xs, const int32_t *corr,
                             __m256 *acc, int rows, int64_t in, const char *ahead) {
    const __m256i nibble = _mm256_set1_epi8(0x0F), flip = _mm256_set1_epi8((char)0x88);
    int64_t blocks = in / QBLOCK;
    for (int m = 0; m < rows; m++) acc[m] = _mm256_setzero_ps();
    for (int64_t s = 0; s < in / 64; s++) {  /* 64 columns: 32 bytes of each row */
        _mm_prefetch(ahead + s * OUTS * 32, _MM_HINT_T1);
        _mm_prefetch(ahead + s * OUTS * 32 + 64, _MM_HINT_T1);
        _mm_prefetch(ahead + s * OUTS * 32 + 128, _MM_HINT_T1);
        _mm_prefetch(ahead + s * OUTS * 32 + 192, _MM_HINT_T1);
        __m256i low[OUTS], high[OUTS];
        for (int r = 0; r < OUTS; r++) {
            /* two's complement nibbles q -> q + 8 in 0..15: flip each nibble's sign bit */
            __m256i bytes = _mm256_xor_si256(_mm256_loadu_si256((const __m256i *)(w[r] + s * 32)), flip);
            low[r] = _mm256_and_si256(bytes, nibble);
            high[r] = _mm256_and_si256(_mm256_srli_epi16(bytes, 4), nibble);
        }
        for (int m = 0; m < rows; m++) {
            const int8_t *x = xq + m * in + s * 64;
            __m256i xlow = _mm256_loadu_si256((const __m256i *)x), xhigh = _mm256_loadu_si256((const __m256i *)(x + 32));
            __m256i v[OUTS], first, second;
            for (int r = 0; r < OUTS; r++) v[r] = dot_nibbles(low[r], high[r], xlow, xhigh);
            totals_of_pair(v, &first, &second);
            int64_t b = m * blocks + 2 * s;
            acc[m] = add_block(acc[m], _mm256_sub_epi32(first, _mm256_set1_epi32(corr[b])), xs[b]);
            acc[m] = add_block(acc[m], _mm256_sub_epi32(second, _mm256_set1_epi32(corr[b + 1])), xs[b + 1]);
        }
    }
}

__attribute__((target("avx2,fma")))
static void tile_int8_rows(const int8_t *const *w, const int8_t *xq, const float *xs, __m256 *acc, int rows,
                           int64_t in, const char *ahead) {
    tile_int8(w, xq, xs, acc, rows, in, ahead);
}

__attribute__((target("avx2,fma")))
static void tile_int8_row(const int8_t *const *w, const int8_t *xq, const float *xs, __m256 *acc, int64_t in,
                          const char *ahead) {
    tile_int8(w, xq, xs, acc, 1, in, ahead);
}

__attribute__((target("avx2,fma")))
static void tile_int4_rows(const uint8_t *const *w, const int8_t *xq, const float *xs, const int32_t *corr,
                           __m256 *acc, int rows, int64_t in, const char *ahead) {
    tile_int4(w, xq, xs, corr, acc, rows, in, ahead);
}

__attribute__((target("avx2,fma")))
static void tile_int4_row(const uint8_t *const *w, const int8_t *xq, const float *xs, const int32_t *corr,
                          __m256 *acc, int64_t in, const char *ahead) {
    tile_int4(w, xq, xs, corr, acc, 1, in, ahead);
}

/* y[rows, out] (fp32) = x[rows, in] (fp32) @ W^T, W int8 [out, in] or int4 [out, in / 2] in THUDM's layout,
 * scale[out] fp32, bias[out] or NULL. in: a multiple of 32 (int8) or 64 (int4). Returns 0, or -1 where
 * memory for the quantized activations could not be had. */
__attribute__((target("avx2,fma")))
int glmpool_int_dot(const void *weight, const float *scale, const float *bias, const float *x, float *y,
                    int64_t rows, int64_t out, int64_t in, int bits) {
    int64_t blocks = in / QBLOCK, row_bytes = bits == 4 ? in / 2 : in;
    int8_t *xq = malloc(rows * in + rows * blocks * (sizeof(float) + sizeof(int32_t)) + 64);
    if (!xq) return -1;
    float *xs = (float *)(xq + rows * in + (64 - rows * in % 64) % 64);  /* aligned enough for floats */
    int32_t *corr = (int32_t *)(xs + rows * blocks);
    #pragma omp parallel for schedule(static) if (rows * in >= 65536)
    for (int64_t m = 0; m < rows; m++)
        quantize_row(x + m * in, xq + m * in, xs + m * blocks, corr + m * blocks, in, bits == 4);
    int64_t tiles = (out + OUTS - 1) / OUTS;
    #pragma omp parallel for schedule(static)
    for (int64_t t = 0; t < tiles; t++) {
        int64_t first = t * OUTS, count = out - first < OUTS ? out - first : OUTS;
        const char *base = (const char *)weight + first * row_bytes;
        const void *w[OUTS];
        for (int r = 0; r < OUTS; r++) w[r] = base + (r < count ? r : count - 1) * row_bytes;
        const char *ahead = base + OUTS * row_bytes;  /* the next tile; prefetching never faults */
        __m256 acc[ROW_GROUP];
        float sums[OUTS];
        for (int64_t m0 = 0; m0 < rows; m0 += ROW_GROUP) {
            int group = rows - m0 < ROW_GROUP ? (int)(rows - m0) : ROW_GROUP;
            const int8_t *xqm = xq + m0 * in;
            const float *xsm = xs + m0 * blocks;
            if (bits == 8 && rows == 1) tile_int8_row((const int8_t *const *)w, xqm, xsm, acc, in, ahead);
            else if (bits == 8) tile_int8_rows((const int8_t *const *)w, xqm, xsm, acc, group, in, ahead);
            else if (rows == 1) tile_int4_row((const uint8_t *const *)w, xqm, xsm, corr, acc, in, ahead);
            else tile_int4_rows((const uint8_t *const *)w, xqm, xsm, corr + m0 * blocks, acc, group, in, ahead);
            for (int m = 0; m < group; m++) {
                _mm256_storeu_ps(sums, acc[m]);
                float *ym = y + (m0 + m) * out + first;
                for (int r = 0; r < count; r++)
                    ym[r] = bias ? sums[r] * scale[first + r] + bias[first + r] : sums[r] * scale[first + r];
            }
        }
    }
    free(xq);
    return 0;
}

#else

/* Without x86-64: never called (glmpool_isa() says 0), only here so that the library loads. */
int glmpool_int_dot(const void *weight, const float *scale, const float *bias, const float *x, float *y,
                    int64_t rows, int64_t out, int64_t in, int bits) {
    (void)weight; (void)scale; (void)bias; (void)x; (void)y; (void)rows; (void)out; (void)in; (void)bits;
    return -1;
}

#endif
