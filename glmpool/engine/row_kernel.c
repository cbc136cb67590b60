/* One row times a weight, for decoding on the CPU: fp32 in oneDNN's reordered layout, int8 in THUDM's,
 * int4 in torch's CPU layout, each read where torch keeps it.
 *
 * Why: decoding one sequence reads every weight once per token, so the speed at which the weights stream
 * is its speed, and torch's kernels stream them slower than these plain AVX-512 or AVX2 loops (figures
 * in row_kernel.py).
 *
 * Batching must not change a sequence's results, and rows in a batch go through torch's kernels, so
 * each kernel here sums in exactly the order torch's multi-row kernel for that format does (described
 * at each). The Python side (row_kernel.py) checks the bits against torch's kernels before using them.
 *
 * The threads are the process's OpenMP threads (torch's own runtime, shared by soname). Compiled at
 * install time (setup.py, optional); without it glmpool runs on torch's kernels alone.
 */
#include <stdint.h>
#include <string.h>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>

#define BLOCK 64

/* 512 with AVX-512 (and F16C, which every such CPU has), 256 with AVX2 and FMA, 0 otherwise: which of the
 * variants below this CPU runs. */
int glmpool_isa(void) {
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("f16c"))
        return 512;
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") ? 256 : 0;
}

/* fp32 in oneDNN's layout AB16b64a: blocks of 64 outputs, each a run of in x 64 floats, input-major (the
 * 16-input sub-blocks are consecutive, so a block reads as [in][64]); out is padded to a multiple of 64.
 * Summed as oneDNN's multi-row matmul (brgemm) sums: for each output, the inputs are split into consecutive
 * chunks of `chunk`; within a chunk the products are accumulated by fused multiply-adds in input order
 * from zero, and the chunks' sums are then added in order; the bias, if any, last. The chunk is oneDNN's
 * choice (here 512 for 1024 inputs and 1024 for 4096 and 16384; 1024 for all three with its AVX2
 * kernels): probed per weight (row_kernel.probe). */

/* Several rows (or one): y[rows, out] = x[rows, in] @ weight^T (+ bias), the weight in 64-output blocks,
 * for each input k the block's 64 weights in turn: fp32 in oneDNN's AB16b64a (as above), fp16 in glmpool's
 * own layout of the same shape (row_kernel.pack_half), int4 in torch's 64-row layout (LOAD_INT4). Each
 * output is summed in chunks of `chunk` inputs, fused multiply-adds in input order within a chunk, the
 * chunks' sums added in order: for fp32 as oneDNN's multi-row matmul sums (above); for int4,
 * one chunk, as torch's int4 kernel sums. So a row's bits depend neither on the other rows nor on how
 * many there are.
 *
 * Why: at 2-16 rows (a batch's decode step) oneDNN reaches ~150-185 GFLOP/s here, FBGEMM's fp16 GEMM
 * ~95-190 and torch's int4 kernel ~170; this reaches ~200-220. A chunk of a block (64-256 KB, held in L2) comes from
 * memory once for all rows; TILE rows at a time keep TILE x 4 vectors of sums in registers, so each 64
 * weights are loaded once per tile; while the tiles work on a chunk they prefetch the next one, which the
 * first tile would otherwise wait for. */
#define TILE 6

#define CHUNK_TIMES_TILE(NAME, WEIGHT, STEP, LOAD64)                                                        \
__attribute__((target("avx512f,fma,f16c"), always_inline))                                                 \
static inline void NAME(const WEIGHT *w, const float *x, float *y, int64_t in, int64_t y_stride,           \
                        int64_t start, int64_t stop, const int rows, const char *ahead, int lines) {       \
    __m512 part[TILE][4];                                                                                   \
    for (int r = 0; r < rows; r++) for (int i = 0; i < 4; i++) part[r][i] = _mm512_setzero_ps();           \
    for (int64_t k = start; k < stop; k++, w += STEP) {                                                     \
        for (int l = 0; l < lines; l++, ahead += 64) _mm_prefetch(ahead, _MM_HINT_T1);                      \
        __m512 wk[4];                                                                                       \
        LOAD64(w, wk);                                                                                      \
        for (int r = 0; r < rows; r++) {                                                                    \
            __m512 xk = _mm512_set1_ps(x[r * in + k]);                                                      \
            for (int i = 0; i < 4; i++) part[r][i] = _mm512_fmadd_ps(xk, wk[i], part[r][i]);                \
        }                                                                                                   \
    }                                                                                                       \
    for (int r = 0; r < rows; r++)                                                                          \
        for (int i = 0; i < 4; i++) {                                                                       \
            float *out = y + r * y_stride + 16 * i;                                                         \
            _mm512_storeu_ps(out, start == 0 ? part[r][i] : _mm512_add_ps(_mm512_loadu_ps(out), part[r][i])); \
        }                                                                                                   \
}

/* Tiles of even heights (16 rows: 6, 5, 5), each height a constant for the compiler. A step reads STEP
 * weights of the chunk; the tiles together prefetch at least as much of the next. */
#define BLOCK_TIMES_ROWS(NAME, TILE_FN, WEIGHT, STEP)                                                       \
__attribute__((target("avx512f,fma,f16c")))                                                                \
static void NAME(const WEIGHT *block, const float *x, float *y, int64_t rows, int64_t in, int64_t y_stride, \
                 int64_t chunk) {                                                                           \
    int64_t tiles = (rows + TILE - 1) / TILE, step_lines = (STEP * sizeof(WEIGHT) + 63) / 64;               \
    int lines = tiles == 1 ? 0 : (int)((step_lines + tiles - 1) / tiles);                                   \
    for (int64_t start = 0; start < in; start += chunk) {                                                   \
        int64_t stop = start + chunk < in ? start + chunk : in;                                             \
        const WEIGHT *w = block + start * STEP;                                                             \
        const char *ahead = (const char *)(block + stop * STEP);                                            \
        for (int64_t t = 0, m = 0; t < tiles; m += rows / tiles + (t < rows % tiles), t++) {                \
            const float *xm = x + m * in;                                                                   \
            float *ym = y + m * y_stride;                                                                   \
            switch (rows / tiles + (t < rows % tiles)) {                                                    \
            case 1: TILE_FN(w, xm, ym, in, y_stride, start, stop, 1, ahead, lines); break;                  \
            case 2: TILE_FN(w, xm, ym, in, y_stride, start, stop, 2, ahead, lines); break;                  \
            case 3: TILE_FN(w, xm, ym, in, y_stride, start, stop, 3, ahead, lines); break;                  \
            case 4: TILE_FN(w, xm, ym, in, y_stride, start, stop, 4, ahead, lines); break;                  \
            case 5: TILE_FN(w, xm, ym, in, y_stride, start, stop, 5, ahead, lines); break;                  \
            default: TILE_FN(w, xm, ym, in, y_stride, start, stop, TILE, ahead, lines);                     \
            }                                                                                               \
            ahead += (stop - start) * lines * 64;                                                           \
        }                                                                                                   \
    }                                                                                                       \
}

/* The blocks spread over the threads; the last block's padding outputs go to a scratch block, not past
 * y's rows. Any width: BLOCK_FN is the AVX-512 or the AVX2 variant. */
#define ROWS_TIMES_BLOCKS(NAME, BLOCK_FN, WEIGHT, STEP)                                                     \
void NAME(const WEIGHT *packed, const float *x, const float *bias, float *y, int64_t rows, int64_t out,     \
          int64_t in, int64_t chunk) {                                                                      \
    int64_t blocks = rows > 0 ? (out + BLOCK - 1) / BLOCK : 0;  /* no rows, no tiles (and no division by 0) */ \
    _Pragma("omp parallel for schedule(static)")                                                            \
    for (int64_t b = 0; b < blocks; b++) {                                                                  \
        int64_t first = b * BLOCK, count = out - first < BLOCK ? out - first : BLOCK;                       \
        if (count == BLOCK) {                                                                               \
            BLOCK_FN(packed + b * in * STEP, x, y + first, rows, in, out, chunk);                           \
        } else {                                                                                            \
            float scratch[TILE * BLOCK];                                                                    \
            for (int64_t m = 0; m < rows; m += TILE) {                                                      \
                int64_t tile = rows - m < TILE ? rows - m : TILE;                                           \
                BLOCK_FN(packed + b * in * STEP, x + m * in, scratch, tile, in, BLOCK, chunk);              \
                for (int64_t r = 0; r < tile; r++)                                                          \
                    memcpy(y + (m + r) * out + first, scratch + r * BLOCK, count * sizeof(float));          \
            }                                                                                               \
        }                                                                                                   \
        if (bias)                                                                                           \
            for (int64_t m = 0; m < rows; m++)                                                              \
                for (int64_t i = 0; i < count; i++) y[m * out + first + i] += bias[first + i];              \
    }                                                                                                       \
}

#define LOAD_FLOAT(p, wk) for (int i = 0; i < 4; i++) wk[i] = _mm512_loadu_ps((p) + 16 * i)
#define LOAD_HALF(p, wk) for (int i = 0; i < 4; i++) wk[i] = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)((p) + 16 * i)))
/* int4 in torch's CPU layout for 64-row blocks: for each input k, 32 bytes; byte d holds rows d (low
 * nibble) and d + 32 (high), byte 16 + d rows d + 16 and d + 48; a nibble is q + 8. permutexvar reads the
 * low 4 bits of each index: a byte's low nibble, then (shifted) its high one. x holds bf16 values widened
 * to fp32; the caller rounds y to bf16. */
#define LOAD_INT4(p, wk) do {                                                                               \
    const __m512 values = _mm512_setr_ps(-8, -7, -6, -5, -4, -3, -2, -1, 0, 1, 2, 3, 4, 5, 6, 7);            \
    __m512i first = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(p)));                           \
    __m512i second = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)((p) + 16)));                   \
    wk[0] = _mm512_permutexvar_ps(first, values);                                                           \
    wk[1] = _mm512_permutexvar_ps(second, values);                                                          \
    wk[2] = _mm512_permutexvar_ps(_mm512_srli_epi32(first, 4), values);                                     \
    wk[3] = _mm512_permutexvar_ps(_mm512_srli_epi32(second, 4), values);                                    \
} while (0)
CHUNK_TIMES_TILE(chunk_times_tile, float, BLOCK, LOAD_FLOAT)
CHUNK_TIMES_TILE(chunk_times_tile_half, uint16_t, BLOCK, LOAD_HALF)
CHUNK_TIMES_TILE(chunk_times_tile_int4, uint8_t, 32, LOAD_INT4)
BLOCK_TIMES_ROWS(block_times_rows, chunk_times_tile, float, BLOCK)
BLOCK_TIMES_ROWS(block_times_rows_half, chunk_times_tile_half, uint16_t, BLOCK)
BLOCK_TIMES_ROWS(block_times_rows_int4, chunk_times_tile_int4, uint8_t, 32)
ROWS_TIMES_BLOCKS(glmpool_rows_times_packed, block_times_rows, float, BLOCK)
ROWS_TIMES_BLOCKS(glmpool_rows_times_half, block_times_rows_half, uint16_t, BLOCK)
ROWS_TIMES_BLOCKS(glmpool_rows_times_int4, block_times_rows_int4, uint8_t, 32)

/* The same for CPUs without AVX-512 (fp32 and fp16; isa 256), the same sums in the same order, so the same
 * bits: 16 vector registers hold the sums of a lone row's 64 outputs (8 x 8 lanes), or of up to 3 rows'
 * 32 outputs, each 8 weights loaded once per tile. */
#define CHUNK_TIMES_TILE_AVX2(NAME, WEIGHT, LOAD8)                                                          \
__attribute__((target("avx2,fma,f16c"), always_inline))                                                    \
static inline void NAME(const WEIGHT *w, const float *x, float *y, int64_t in, int64_t y_stride,           \
                        int64_t start, int64_t stop, const int rows, const int vectors) {                  \
    __m256 part[3][8];                                                                                      \
    for (int r = 0; r < rows; r++) for (int i = 0; i < vectors; i++) part[r][i] = _mm256_setzero_ps();    \
    for (int64_t k = start; k < stop; k++, w += BLOCK) {                                                    \
        __m256 xk[3];                                                                                       \
        for (int r = 0; r < rows; r++) xk[r] = _mm256_set1_ps(x[r * in + k]);                               \
        for (int i = 0; i < vectors; i++) {                                                                 \
            __m256 wk = LOAD8(w + 8 * i);                                                                   \
            for (int r = 0; r < rows; r++) part[r][i] = _mm256_fmadd_ps(xk[r], wk, part[r][i]);             \
        }                                                                                                   \
    }                                                                                                       \
    for (int r = 0; r < rows; r++)                                                                          \
        for (int i = 0; i < vectors; i++) {                                                                 \
            float *out = y + r * y_stride + 8 * i;                                                          \
            _mm256_storeu_ps(out, start == 0 ? part[r][i] : _mm256_add_ps(_mm256_loadu_ps(out), part[r][i])); \
        }                                                                                                   \
}

#define BLOCK_TIMES_ROWS_AVX2(NAME, TILE_FN, WEIGHT)                                                        \
__attribute__((target("avx2,fma,f16c")))                                                                   \
static void NAME(const WEIGHT *block, const float *x, float *y, int64_t rows, int64_t in, int64_t y_stride, \
                 int64_t chunk) {                                                                           \
    for (int64_t start = 0; start < in; start += chunk) {                                                   \
        int64_t stop = start + chunk < in ? start + chunk : in;                                             \
        const WEIGHT *w = block + start * BLOCK;                                                            \
        if (rows == 1) {                                                                                    \
            TILE_FN(w, x, y, in, y_stride, start, stop, 1, 8);                                              \
            continue;                                                                                       \
        }                                                                                                   \
        for (int half = 0; half < BLOCK; half += 32)                                                        \
            for (int64_t m = 0; m < rows; m += 3) {                                                         \
                const float *xm = x + m * in;                                                               \
                float *ym = y + m * y_stride + half;                                                        \
                switch (rows - m) {                                                                         \
                case 1: TILE_FN(w + half, xm, ym, in, y_stride, start, stop, 1, 4); break;                  \
                case 2: TILE_FN(w + half, xm, ym, in, y_stride, start, stop, 2, 4); break;                  \
                default: TILE_FN(w + half, xm, ym, in, y_stride, start, stop, 3, 4);                        \
                }                                                                                           \
            }                                                                                               \
    }                                                                                                       \
}

#define LOAD8_FLOAT(p) _mm256_loadu_ps(p)
#define LOAD8_HALF(p) _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(p)))
CHUNK_TIMES_TILE_AVX2(chunk_times_tile_avx2, float, LOAD8_FLOAT)
CHUNK_TIMES_TILE_AVX2(chunk_times_tile_half_avx2, uint16_t, LOAD8_HALF)
BLOCK_TIMES_ROWS_AVX2(block_times_rows_avx2, chunk_times_tile_avx2, float)
BLOCK_TIMES_ROWS_AVX2(block_times_rows_half_avx2, chunk_times_tile_half_avx2, uint16_t)
ROWS_TIMES_BLOCKS(glmpool_rows_times_packed_avx2, block_times_rows_avx2, float, BLOCK)
ROWS_TIMES_BLOCKS(glmpool_rows_times_half_avx2, block_times_rows_half_avx2, uint16_t, BLOCK)

/* y[out] = int8 weight[out, in] (THUDM's row-major bytes, unit scales) @ x[in], summed as torch's
 * weight-only int8 matmul (_weight_int8pack_mm, AVX-512, bf16 input) sums one output: 16 lanes, lane j
 * accumulating inputs j, j + 16, ... by fused multiply-adds, then the lanes reduced by
 * _mm512_reduce_add_ps. x holds bf16 values widened to fp32; the caller rounds y to bf16 as torch does.
 * ROWS outputs at a time give that many independent chains; in must be a multiple of 16. */
#define ROWS 8

__attribute__((target("avx512f,fma")))
static void rows_times_x_int8(const int8_t *w, const float *x, float *y, int64_t rows, int64_t in) {
    __m512 acc[ROWS];
    for (int r = 0; r < ROWS; r++) acc[r] = _mm512_setzero_ps();
    /* Each step reads 16 bytes of each of ROWS rows, 128 bytes in all; the rows are short (1 KB in the
     * medium model), too short for the hardware prefetcher to follow ROWS streams, so each step also
     * fetches the next 128 bytes of the next block, into L2 (a block of 4096-byte rows is 32 KB, all of
     * L1): 1.9x torch's speed for 1024-byte rows, 1.3x for 4096, 1.1x for 16384. */
    const char *next_block = (const char *)(w + ROWS * in);
    for (int64_t k = 0; k < in; k += 16) {
        __m512 xk = _mm512_loadu_ps(x + k);
        _mm_prefetch(next_block + k * ROWS, _MM_HINT_T1);
        _mm_prefetch(next_block + k * ROWS + 64, _MM_HINT_T1);
        for (int r = 0; r < ROWS; r++) if (r < rows) {
            __m128i bytes = _mm_loadu_si128((const __m128i *)(w + r * in + k));
            acc[r] = _mm512_fmadd_ps(xk, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(bytes)), acc[r]);
        }
    }
    for (int r = 0; r < rows; r++) y[r] = _mm512_reduce_add_ps(acc[r]);
}

/* torch's AVX2 int8 kernel sums 8 lanes (inputs j, j + 8, ...) and reduces them thus: the two halves
 * added, then lanes 2 apart, then neighbours. */
__attribute__((target("avx2,fma")))
static float reduce_8_lanes(__m256 v) {
    v = _mm256_add_ps(v, _mm256_permute2f128_ps(v, v, 0x1));
    v = _mm256_add_ps(v, _mm256_shuffle_ps(v, v, 0x4E));
    v = _mm256_add_ps(v, _mm256_shuffle_ps(v, v, 0xB1));
    return _mm256_cvtss_f32(v);
}

/* `rows` a constant for the compiler where it is ROWS (all but a matrix's last block): with it unknown, the
 * loop branched on it for each output and kept a flag per output in memory, ~60 instructions per 64 weights
 * instead of ~30, and a matrix held in L2 or L3 streamed ~1.2x slower (bench/row_kernel_ab.py). */
__attribute__((target("avx2,fma"), always_inline))
static inline void rows_times_x_int8_avx2(const int8_t *w, const float *x, float *y, const int64_t rows, int64_t in) {
    __m256 acc[ROWS];
    for (int r = 0; r < ROWS; r++) acc[r] = _mm256_setzero_ps();
    const char *next_block = (const char *)(w + ROWS * in);  /* as above: 64 bytes a step */
    for (int64_t k = 0; k < in; k += 8) {
        __m256 xk = _mm256_loadu_ps(x + k);
        _mm_prefetch(next_block + k * ROWS, _MM_HINT_T1);
        for (int r = 0; r < ROWS; r++) if (r < rows) {
            __m256i v = _mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(w + r * in + k)));
            acc[r] = _mm256_fmadd_ps(xk, _mm256_cvtepi32_ps(v), acc[r]);
        }
    }
    for (int r = 0; r < rows; r++) y[r] = reduce_8_lanes(acc[r]);
}

__attribute__((target("avx2,fma")))
static void full_rows_times_x_int8_avx2(const int8_t *w, const float *x, float *y, int64_t in) {
    rows_times_x_int8_avx2(w, x, y, ROWS, in);
}

__attribute__((target("avx2,fma")))
static void some_rows_times_x_int8_avx2(const int8_t *w, const float *x, float *y, int64_t rows, int64_t in) {
    rows_times_x_int8_avx2(w, x, y, rows, in);
}

/* One row; lanes: 16 (torch's AVX-512 kernel, in % 16 == 0) or 8 (its AVX2 one, in % 8 == 0). */
static void row_times_int8(const int8_t *weight, const float *x, float *y, int64_t out, int64_t in, int lanes) {
    int64_t blocks = (out + ROWS - 1) / ROWS;
    #pragma omp parallel for schedule(static)
    for (int64_t b = 0; b < blocks; b++) {
        int64_t first = b * ROWS, rows = out - first < ROWS ? out - first : ROWS;
        if (lanes == 16)
            rows_times_x_int8(weight + first * in, x, y + first, rows, in);
        else if (rows == ROWS)
            full_rows_times_x_int8_avx2(weight + first * in, x, y + first, in);
        else
            some_rows_times_x_int8_avx2(weight + first * in, x, y + first, rows, in);
    }
}

/* Several rows at once: y[rows, out] = x[rows, in] @ int8 weight[out, in]^T, every output summed exactly
 * as above (so as torch's kernel sums it, whatever the number of rows), but each block of TILE_OUT
 * weight rows is converted to fp32 once for TILE_ROWS input rows instead of once per row. At 16 rows
 * 1.3-1.5x torch's own multi-row kernel here, at 64 rows 1.3-1.7x; at 2-4 rows no faster. */
#define TILE_OUT 4

#define INT8_TILE(NAME, TARGET, VEC, LANES, TILE_ROWS, ZERO, LOADX, WIDEN, FMA, REDUCE)                      \
__attribute__((target(TARGET)))                                                                             \
static void NAME(const int8_t *w, const float *x, float *y, int outs, int rows, int64_t in, int64_t out) {  \
    VEC acc[TILE_ROWS][TILE_OUT];                                                                           \
    for (int m = 0; m < TILE_ROWS; m++) for (int r = 0; r < TILE_OUT; r++) acc[m][r] = ZERO();              \
    for (int64_t k = 0; k < in; k += LANES) {                                                               \
        VEC wk[TILE_OUT];                                                                                   \
        for (int r = 0; r < TILE_OUT; r++) wk[r] = r < outs ? WIDEN(w + r * in + k) : ZERO();               \
        for (int m = 0; m < TILE_ROWS; m++) if (m < rows) {                                                 \
            VEC xk = LOADX(x + m * in + k);                                                                 \
            for (int r = 0; r < TILE_OUT; r++) if (r < outs) acc[m][r] = FMA(xk, wk[r], acc[m][r]);         \
        }                                                                                                   \
    }                                                                                                       \
    for (int m = 0; m < rows; m++) for (int r = 0; r < outs; r++) y[m * out + r] = REDUCE(acc[m][r]);        \
}

#define WIDEN_16(p) _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(p))))
#define WIDEN_8(p) _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(p))))
INT8_TILE(tile4_int8, "avx512f,fma", __m512, 16, 4, _mm512_setzero_ps, _mm512_loadu_ps, WIDEN_16, _mm512_fmadd_ps,
          _mm512_reduce_add_ps)
INT8_TILE(tile8_int8, "avx512f,fma", __m512, 16, 8, _mm512_setzero_ps, _mm512_loadu_ps, WIDEN_16, _mm512_fmadd_ps,
          _mm512_reduce_add_ps)
INT8_TILE(tile2_int8_avx2, "avx2,fma", __m256, 8, 2, _mm256_setzero_ps, _mm256_loadu_ps, WIDEN_8, _mm256_fmadd_ps,
          reduce_8_lanes)

/* x [rows, in] (bf16 values as fp32): a lone row by row_times_int8 (lanes as there), more in tiles of 4 input
 * rows where 4 rows of x fit in L1 (in <= 2048), else 8. */
static void rows_times_int8(const int8_t *weight, const float *x, float *y, int64_t rows, int64_t out, int64_t in,
                            int lanes) {
    if (rows == 1) {
        row_times_int8(weight, x, y, out, in, lanes);
        return;
    }
    int64_t blocks = (out + TILE_OUT - 1) / TILE_OUT;
    int tile_rows = lanes == 8 ? 2 : in <= 2048 ? 4 : 8;
    #pragma omp parallel for schedule(static)
    for (int64_t b = 0; b < blocks; b++) {
        int64_t first = b * TILE_OUT;
        int outs = out - first < TILE_OUT ? (int)(out - first) : TILE_OUT;
        for (int64_t m = 0; m < rows; m += tile_rows) {
            int count = rows - m < tile_rows ? (int)(rows - m) : tile_rows;
            const int8_t *w = weight + first * in;
            float *ym = y + m * out + first;
            if (lanes == 8)
                tile2_int8_avx2(w, x + m * in, ym, outs, count, in, out);
            else if (tile_rows == 4)
                tile4_int8(w, x + m * in, ym, outs, count, in, out);
            else
                tile8_int8(w, x + m * in, ym, outs, count, in, out);
        }
    }
}

/* torch's conversion of a float to bf16: to nearest, ties to even; a NaN to all ones, as its vectorized
 * conversion gives it. */
static inline uint16_t bf16_of(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    return (u & 0x7FFFFFFF) > 0x7F800000 ? 0xFFFF : (uint16_t)((u + 0x7FFF + ((u >> 16) & 1)) >> 16);
}

/* x [rows, in] and y [rows, out] in bf16, as torch's int8 and int4 kernels take and give them: converted
 * here rather than by two torch operations around each call (a decode step makes ~200 small ones, which
 * cost it more than the products' arithmetic does at int8 or int4). scratch: rows * (in + out) floats. */
static float *widen_bf16(const uint16_t *x16, float *scratch, int64_t n) {
    for (int64_t i = 0; i < n; i++) {
        uint32_t u = (uint32_t)x16[i] << 16;
        memcpy(scratch + i, &u, 4);
    }
    return scratch;
}

static void round_to_bf16(const float *y, uint16_t *y16, int64_t n) {
    #pragma omp parallel for schedule(static) if (n >= 65536)
    for (int64_t i = 0; i < n; i++)
        y16[i] = bf16_of(y[i]);
}

void glmpool_rows_times_int8(const int8_t *weight, const uint16_t *x16, uint16_t *y16, float *scratch, int64_t rows,
                             int64_t out, int64_t in, int lanes) {
    float *x = widen_bf16(x16, scratch, rows * in), *y = scratch + rows * in;
    rows_times_int8(weight, x, y, rows, out, in, lanes);
    round_to_bf16(y, y16, rows * out);
}

/* y[out] = int4 weight @ x[in] for CPUs without AVX-512, the weight in torch's AVX2 int4 layout, 32-row
 * blocks: for each input k, 16 bytes; byte d holds rows d (low nibble) and d + 16 (high); a nibble is q + 8.
 * Summed as torch's weight-only int4 kernel (_weight_int4pack_mm_for_cpu, unit scales and zeros) sums: each
 * output by fused multiply-adds in input order from zero. x holds bf16 values widened to fp32; the caller
 * rounds y to bf16. (With AVX-512, torch's 64-row layout goes through glmpool_rows_times_int4, one row or
 * several.) */
__attribute__((target("avx2,fma")))
static void block32_times_row_int4(const uint8_t *p, const float *x, float *y, int64_t in) {
    const __m256i low = _mm256_set1_epi32(0xF), eight = _mm256_set1_epi32(8);
    __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
    for (int64_t k = 0; k < in; k++, p += 16) {
        __m256 xk = _mm256_set1_ps(x[k]);
        __m256i first = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)p));
        __m256i second = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(p + 8)));
        __m256i nibbles[4] = {_mm256_and_si256(first, low), _mm256_and_si256(second, low),
                              _mm256_srli_epi32(first, 4), _mm256_srli_epi32(second, 4)};
        for (int i = 0; i < 4; i++)
            acc[i] = _mm256_fmadd_ps(xk, _mm256_cvtepi32_ps(_mm256_sub_epi32(nibbles[i], eight)), acc[i]);
    }
    for (int i = 0; i < 4; i++)
        _mm256_storeu_ps(y + 8 * i, acc[i]);
}

/* The tiled kernels' signature (no bias, one chunk); out a multiple of 32. */
void glmpool_row_times_int4(const uint8_t *packed, const float *x, const float *bias, float *y, int64_t rows,
                            int64_t out, int64_t in, int64_t chunk) {
    (void)bias; (void)chunk;
    int64_t blocks = out / 32;
    #pragma omp parallel for schedule(static)
    for (int64_t b = 0; b < blocks; b++)
        for (int64_t m = 0; m < rows; m++)
            block32_times_row_int4(packed + b * in * 16, x + m * in, y + m * out + b * 32, in);
}

/* int4 with bf16 in and out, as int8's: by the tiled kernel for torch's 64-row layout (`wide`), else the
 * lone-row one for its 32-row layout. */
void glmpool_rows_times_int4_bf16(const uint8_t *packed, const uint16_t *x16, uint16_t *y16, float *scratch,
                                  int64_t rows, int64_t out, int64_t in, int wide) {
    float *x = widen_bf16(x16, scratch, rows * in), *y = scratch + rows * in;
    if (wide)
        glmpool_rows_times_int4(packed, x, NULL, y, rows, out, in, in);
    else
        glmpool_row_times_int4(packed, x, NULL, y, rows, out, in, in);
    round_to_bf16(y, y16, rows * out);
}

#else

int glmpool_isa(void) { return 0; }

/* Without x86-64: never called (glmpool_isa() says 0), only here so that the library loads. */
#define STUB(NAME, WEIGHT)                                                                                  \
void NAME(const WEIGHT *packed, const float *x, const float *bias, float *y, int64_t rows, int64_t out,     \
          int64_t in, int64_t chunk) {                                                                      \
    (void)packed; (void)x; (void)bias; (void)y; (void)rows; (void)out; (void)in; (void)chunk;               \
}
STUB(glmpool_rows_times_packed_avx2, float)
STUB(glmpool_rows_times_packed, float)
STUB(glmpool_rows_times_half, uint16_t)
STUB(glmpool_rows_times_half_avx2, uint16_t)
STUB(glmpool_rows_times_int4, uint8_t)
STUB(glmpool_row_times_int4, uint8_t)

void glmpool_rows_times_int8(const int8_t *weight, const uint16_t *x16, uint16_t *y16, float *scratch, int64_t rows,
                             int64_t out, int64_t in, int lanes) {
    (void)weight; (void)x16; (void)y16; (void)scratch; (void)rows; (void)out; (void)in; (void)lanes;
}

void glmpool_rows_times_int4_bf16(const uint8_t *packed, const uint16_t *x16, uint16_t *y16, float *scratch,
                                  int64_t rows, int64_t out, int64_t in, int wide) {
    (void)packed; (void)x16; (void)y16; (void)scratch; (void)rows; (void)out; (void)in; (void)wide;
}

#endif
