// Helpers shared by zturbo's CUDA kernels: half <-> f32 loads and stores, warp and block
// reductions over 256-thread blocks.
#pragma once
#include <cuda_fp16.h>
#include <cuda_bf16.h>

#define THREADS 256

__device__ __forceinline__ float load_f(const __half *p) { return __half2float(*p); }
__device__ __forceinline__ float load_f(const __nv_bfloat16 *p) { return __bfloat162float(*p); }
__device__ __forceinline__ float load_f(const float *p) { return *p; }
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
