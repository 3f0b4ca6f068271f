// Row softmax for half types, one 256-thread block per row, the row held in registers: one read and
// one write of the scores, f32 arithmetic. candle's kernel gives each row one warp and makes three
// passes over it (five memory sweeps); on an H100 it took 6 ms per 1024² Z-Image layer (35 % of the
// denoiser's time), far from the memory bound. Compiled to PTX by build.rs (feature `cuda`).
#include "common.cuh"

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
