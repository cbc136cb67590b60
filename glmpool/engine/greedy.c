/* A greedy decode step's choice, for each row of logits [rows, vocab] (fp32): the index of the row's first
 * maximum (torch.argmax's answer) and whether the row is surely valid, in one pass over it.
 *
 * Why: generate.next_tokens checks each row for NaN/inf through the sum of its logits (as the reference
 * does: an infinite sum counts as invalid), then finds the maximum in chunks: ~8 torch calls and three
 * passes over 130528 logits, a few parallel regions, a tenth of a millisecond of a batch-1 step.
 *
 * "Surely valid": every logit is finite and no larger in magnitude than FLT_MAX / (2 vocab), so that no sum
 * of the row's logits in any order can overflow (each rounding grows a partial sum by at most 2^-24 of it).
 * A row for which this does not hold is left to the caller, which checks it as before: the answers are
 * always the ones torch's sum and argmax give. -0.0 and 0.0 compare equal, as in torch. */
#include <float.h>
#include <math.h>
#include <stdint.h>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>

/* The row's largest value (any of equal ones) and whether every |x| <= limit (false for a NaN): four
 * independent chains, so that the loop streams at the memory's pace. */
__attribute__((target("avx2")))
static float row_maximum_avx2(const float *x, int64_t n, float limit, int *bounded) {
    const __m256 sign = _mm256_set1_ps(-0.0f), bound = _mm256_set1_ps(limit);
    __m256 best[4], inside[4];
    for (int c = 0; c < 4; c++) {
        best[c] = _mm256_set1_ps(-INFINITY);
        inside[c] = _mm256_castsi256_ps(_mm256_set1_epi32(-1));
    }
    int64_t i = 0;
    for (; i + 32 <= n; i += 32)
        for (int c = 0; c < 4; c++) {
            __m256 v = _mm256_loadu_ps(x + i + 8 * c);
            best[c] = _mm256_max_ps(best[c], v);
            inside[c] = _mm256_and_ps(inside[c], _mm256_cmp_ps(_mm256_andnot_ps(sign, v), bound, _CMP_LE_OQ));
        }
    __m256 all_best = _mm256_max_ps(_mm256_max_ps(best[0], best[1]), _mm256_max_ps(best[2], best[3]));
    __m256 all_inside = _mm256_and_ps(_mm256_and_ps(inside[0], inside[1]), _mm256_and_ps(inside[2], inside[3]));
    float lanes[8];
    _mm256_storeu_ps(lanes, all_best);
    float top = lanes[0];
    for (int l = 1; l < 8; l++) top = lanes[l] > top ? lanes[l] : top;
    int ok = _mm256_movemask_ps(all_inside) == 0xff;
    for (; i < n; i++) {
        ok &= x[i] <= limit && x[i] >= -limit;
        top = x[i] > top ? x[i] : top;
    }
    *bounded = ok;
    return top;
}

/* The first i with x[i] == value (one exists). */
__attribute__((target("avx2")))
static int64_t first_equal_avx2(const float *x, int64_t n, float value) {
    const __m256 v = _mm256_set1_ps(value);
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        int equal = _mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(x + i), v, _CMP_EQ_OQ));
        if (equal)
            return i + __builtin_ctz(equal);
    }
    while (x[i] != value) i++;
    return i;
}
#define HAVE_AVX2 1
#endif

static float row_maximum_c(const float *x, int64_t n, float limit, int *bounded) {
    float top = -INFINITY;
    int ok = 1;
    for (int64_t i = 0; i < n; i++) {
        ok &= x[i] <= limit && x[i] >= -limit;
        top = x[i] > top ? x[i] : top;
    }
    *bounded = ok;
    return top;
}

static int64_t first_equal_c(const float *x, float value) {
    int64_t i = 0;
    while (x[i] != value) i++;
    return i;
}

/* index[r]: row r's first maximum, where valid[r] is 1 (else 0 and index[r] unset). isa >= 256: AVX2. */
void glmpool_greedy(const float *logits, int64_t rows, int64_t vocab, int64_t *index, uint8_t *valid, int isa) {
    float limit = (float)(FLT_MAX / (2.0 * (double)vocab));
    for (int64_t r = 0; r < rows; r++) {
        const float *x = logits + r * vocab;
        int bounded;
#ifdef HAVE_AVX2
        int wide = isa >= 256;
        float top = wide ? row_maximum_avx2(x, vocab, limit, &bounded) : row_maximum_c(x, vocab, limit, &bounded);
#else
        float top = row_maximum_c(x, vocab, limit, &bounded);
        (void)isa;
#endif
        valid[r] = bounded && vocab > 0;
        if (!valid[r])
            continue;
#ifdef HAVE_AVX2
        index[r] = wide ? first_equal_avx2(x, vocab, top) : first_equal_c(x, top);
#else
        index[r] = first_equal_c(x, top);
#endif
    }
}
