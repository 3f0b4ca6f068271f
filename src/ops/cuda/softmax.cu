// Row softmax for half types, one 256-thread block per row, the row held in registers: one read and
// one write of the scores, f32 arithmetic. candle's kernel gives each row one warp and makes three
// passes over it (five memory sweeps); on an H100 it took 6 ms per 1024² Z-Image layer (35 % of the
// denoiser's time), far from the memory bound. Compiled to PTX by build.rs (feature `cuda`).
#include <cuda_fp16.h>
#include <cuda_bf16.h>

#define THREADS 256

__device__ __forceinline__ float load_f(const __half *p) { return __half2float(*p); }
__device__ __forceinline__ float load_f(const __nv_bfloat16 *p) { return __bfloat162float(*p); }
__device__ __forceinline__ void store_f(__half *p, float v) { *p = __float2half_rn(v); }
__device__ __forceinline__ void store_f(__nv_bfloat16 *p, float v) { *p = __float2bfloat16_rn(v); }

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffff, v, o));
    return v;
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffff, v, o);
    return v;
}

// Reduces across the block's 8 warps; every thread gets the result.
template <bool MAX>
__device__ __forceinline__ float block_reduce(float v, float *shared) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    v = MAX ? warp_max(v) : warp_sum(v);
    __syncthreads();  // `shared` may still be read by a previous reduction
    if (lane == 0) shared[warp] = v;
    __syncthreads();
    v = lane < THREADS / 32 ? shared[lane] : (MAX ? -INFINITY : 0.0f);
    return MAX ? warp_max(v) : warp_sum(v);
}

template <typename T, int ITEMS>
__device__ void softmax_rows(const T *__restrict__ x, T *__restrict__ y, const int ncols) {
    __shared__ float shared[THREADS / 32];
    const size_t row = blockIdx.x;
    const T *xr = x + row * ncols;
    T *yr = y + row * ncols;
    float v[ITEMS];
    float m = -INFINITY;
#pragma unroll
    for (int i = 0; i < ITEMS; i++) {
        const int c = threadIdx.x + i * THREADS;
        v[i] = c < ncols ? load_f(xr + c) : -INFINITY;
        m = fmaxf(m, v[i]);
    }
    m = block_reduce<true>(m, shared);
    float s = 0.0f;
#pragma unroll
    for (int i = 0; i < ITEMS; i++) {
        const int c = threadIdx.x + i * THREADS;
        v[i] = c < ncols ? __expf(v[i] - m) : 0.0f;
        s += v[i];
    }
    s = block_reduce<false>(s, shared);
    const float inv = 1.0f / s;
#pragma unroll
    for (int i = 0; i < ITEMS; i++) {
        const int c = threadIdx.x + i * THREADS;
        if (c < ncols) store_f(yr + c, v[i] * inv);
    }
}

#define SOFTMAX(T, NAME, ITEMS)                                                               \
    extern "C" __global__ void __launch_bounds__(THREADS)                                     \
        NAME##_##ITEMS(const T *x, T *y, const int ncols) {                                   \
        softmax_rows<T, ITEMS>(x, y, ncols);                                                  \
    }

SOFTMAX(__half, zt_softmax_f16, 4)
SOFTMAX(__half, zt_softmax_f16, 8)
SOFTMAX(__half, zt_softmax_f16, 16)
SOFTMAX(__half, zt_softmax_f16, 32)
SOFTMAX(__half, zt_softmax_f16, 64)
SOFTMAX(__nv_bfloat16, zt_softmax_bf16, 4)
SOFTMAX(__nv_bfloat16, zt_softmax_bf16, 8)
SOFTMAX(__nv_bfloat16, zt_softmax_bf16, 16)
SOFTMAX(__nv_bfloat16, zt_softmax_bf16, 32)
SOFTMAX(__nv_bfloat16, zt_softmax_bf16, 64)

// ---------------------------------------------------------------------------------------------
// y = x · rsqrt(mean(x²) + eps) · w (· s[batch]), one 256-thread block per row, f32 arithmetic,
// one rounding to the output type. The DiT's norms take the residual stream (bf16) or a branch
// output (f16) and feed f16 matmuls; unfused that was an f32 copy, the norm, a cast back and a
// separate modulation multiply — five sweeps of the activations instead of two.
__device__ __forceinline__ float load_f(const float *p) { return *p; }

template <typename TI, typename TO>
__device__ void rms_norm_scale(const TI *__restrict__ x, TO *__restrict__ y, const TO *__restrict__ w,
                               const TO *__restrict__ s, const int ncols, const int rows_per_item,
                               const float eps) {
    __shared__ float shared[THREADS / 32];
    const size_t row = blockIdx.x;
    const TI *xr = x + row * ncols;
    TO *yr = y + row * ncols;
    const TO *sr = s == nullptr ? nullptr : s + (row / rows_per_item) * ncols;
    float acc = 0.0f;
    for (int c = threadIdx.x; c < ncols; c += THREADS) {
        const float v = load_f(xr + c);
        acc += v * v;
    }
    acc = block_reduce<false>(acc, shared);
    const float r = rsqrtf(acc / ncols + eps);
    for (int c = threadIdx.x; c < ncols; c += THREADS) {
        float v = load_f(xr + c) * r * load_f(w + c);
        if (sr != nullptr) v *= load_f(sr + c);
        store_f(yr + c, v);
    }
}

#define RMS_NORM_SCALE(TI, TO, NAME)                                                          \
    extern "C" __global__ void __launch_bounds__(THREADS)                                     \
        NAME(const TI *x, TO *y, const TO *w, const TO *s, const int ncols,                   \
             const int rows_per_item, const float eps) {                                      \
        rms_norm_scale<TI, TO>(x, y, w, s, ncols, rows_per_item, eps);                        \
    }

RMS_NORM_SCALE(__half, __half, zt_rms_norm_scale_f16_f16)
RMS_NORM_SCALE(__nv_bfloat16, __half, zt_rms_norm_scale_bf16_f16)
RMS_NORM_SCALE(__nv_bfloat16, __nv_bfloat16, zt_rms_norm_scale_bf16_bf16)
RMS_NORM_SCALE(__half, __nv_bfloat16, zt_rms_norm_scale_f16_bf16)
