// y = x · rsqrt(mean(x²) + eps) · w (· s[batch]), one 256-thread block per row, f32 arithmetic,
// one rounding to the output type. The DiT's norms take the residual stream (bf16) or a branch
// output (f16) and feed f16 matmuls; unfused that was an f32 copy, the norm, a cast back and a
// separate modulation multiply — five sweeps of the activations instead of two. Compiled to PTX
// by build.rs (feature `cuda`).
#include "common.cuh"

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
