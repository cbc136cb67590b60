// glmpool's int8/int4 CUDA kernels for GPUs without torch's (before Ampere: T4, V100, RTX 20xx), reading
// THUDM's stored format as it is: per output row n, `weight` row n holds K int8 values, or K/2 bytes of two
// signed nibbles (the even column high); `scale` [N] fp16.
//
// Compiled at first use by NVRTC for the device's own architecture and launched through cpm_kernels
// (cpm.py), THUDM's package: the same loader their quantization.py uses for its kernels, with source
// of our own. No header is included, so any NVRTC compiles it: fp16 travels as its 16 bits
// (unsigned short) and is converted by the PTX conversion instructions.
//
// - quant_gemv_int8/int4: y [M, N] = x [M, K] @ W^T for a few rows (a decode step of up to MAX_ROWS
//   sequences), reading each weight once: int4 moves a quarter of fp16's bytes, which is the point on a
//   memory-bound step. One warp per output row; every product summed in fp32 and scaled before the one
//   rounding to fp16, so a sum never leaves fp16's range unless the true result does (|q| up to 127
//   times |y| would).
// - quant_dequant_int8/int4: W [N, K] fp16 = q * scale for more rows (prompts), then multiplied by
//   cuBLAS: THUDM's scheme, one pass instead of torch's several element-wise kernels.
// Both need K % 8 == 0 (whole 32-bit words of weights in a row, 16-byte rows of x).

#define MAX_ROWS 8

__device__ __forceinline__ float half_to_float(unsigned short h) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
}

__device__ __forceinline__ unsigned short float_to_half(float f) {
    unsigned short h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
    return h;
}

// The PER_WORD = 32 / BITS weights of one little-endian 32-bit word, in column order.
template <int BITS>
__device__ __forceinline__ void unpack_word(int word, float *q) {
#pragma unroll
    for (int j = 0; j < 4; ++j) {
        const int byte = (signed char)(word >> (8 * j));  // sign-extended
        if (BITS == 8) {
            q[j] = (float)byte;
        } else {
            q[2 * j] = (float)(byte >> 4);  // even column: the high nibble, the arithmetic shift keeps its sign
            q[2 * j + 1] = (float)((signed char)(byte << 4) >> 4);  // odd column: the low nibble, sign-extended
        }
    }
}

template <int BITS>
__device__ __forceinline__ void gemv(const int *__restrict__ weight, const unsigned short *__restrict__ scale,
                                     const unsigned short *__restrict__ x, unsigned short *__restrict__ y,
                                     int M, int N, int K) {
    constexpr int PER_WORD = 32 / BITS;
    const int lane = threadIdx.x & 31;
    const int n = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (n >= N) return;
    const int words = K / PER_WORD;
    const int *row = weight + (long long)n * words;
    float sum[MAX_ROWS];
#pragma unroll
    for (int m = 0; m < MAX_ROWS; ++m) sum[m] = 0.0f;
    for (int i = lane; i < words; i += 32) {
        float q[PER_WORD];
        unpack_word<BITS>(__ldg(row + i), q);
#pragma unroll
        for (int m = 0; m < MAX_ROWS; ++m) {
            if (m < M) {
                // x's PER_WORD columns of this word, as fp16 pairs
                const unsigned int *pairs = (const unsigned int *)(x + (long long)m * K + i * PER_WORD);
#pragma unroll
                for (int j = 0; j < PER_WORD; j += 2) {
                    const unsigned int pair = __ldg(pairs + j / 2);
                    sum[m] += q[j] * half_to_float((unsigned short)(pair & 0xFFFF));
                    sum[m] += q[j + 1] * half_to_float((unsigned short)(pair >> 16));
                }
            }
        }
    }
    const float s = half_to_float(scale[n]);
#pragma unroll
    for (int m = 0; m < MAX_ROWS; ++m) {
        if (m < M) {
            float total = sum[m];
            for (int offset = 16; offset > 0; offset >>= 1) total += __shfl_down_sync(0xFFFFFFFF, total, offset);
            if (lane == 0) y[(long long)m * N + n] = float_to_half(total * s);
        }
    }
}

template <int BITS>
__device__ __forceinline__ void dequant(const int *__restrict__ weight, const unsigned short *__restrict__ scale,
                                        unsigned short *__restrict__ out, int N, int K) {
    constexpr int PER_WORD = 32 / BITS;
    const int words = K / PER_WORD;
    const long long total = (long long)N * words;
    for (long long w = blockIdx.x * (long long)blockDim.x + threadIdx.x; w < total;
         w += (long long)gridDim.x * blockDim.x) {
        const int n = (int)(w / words);
        float q[PER_WORD];
        unpack_word<BITS>(__ldg(weight + w), q);
        const float s = half_to_float(scale[n]);
        unsigned short *o = out + w * PER_WORD;  // row n, columns (w - n * words) * PER_WORD on
#pragma unroll
        for (int j = 0; j < PER_WORD; ++j) o[j] = float_to_half(q[j] * s);  // q * s is exact in fp32
    }
}

#define ENTRY_POINTS(BITS)                                                                                      \
    extern "C" __global__ void quant_gemv_int##BITS(const int *weight, const unsigned short *scale,             \
                                                    const unsigned short *x, unsigned short *y, int M, int N,   \
                                                    int K) {                                                    \
        gemv<BITS>(weight, scale, x, y, M, N, K);                                                               \
    }                                                                                                           \
    extern "C" __global__ void quant_dequant_int##BITS(const int *weight, const unsigned short *scale,          \
                                                       unsigned short *out, int N, int K) {                     \
        dequant<BITS>(weight, scale, out, N, K);                                                                \
    }
ENTRY_POINTS(8)
ENTRY_POINTS(4)
