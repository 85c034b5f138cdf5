// Multi-tensor EMA kernel, templated over teacher and student dtypes (see ema.cuh).
#include "ema.cuh"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace sdae_fast {
namespace {

constexpr int kThreads = 256;

template <typename T> __device__ __forceinline__ float to_float(T x);
template <> __device__ __forceinline__ float to_float<float>(float x) { return x; }
template <> __device__ __forceinline__ float to_float<__half>(__half x) { return __half2float(x); }
template <> __device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T> __device__ __forceinline__ T from_float(float x);
template <> __device__ __forceinline__ float from_float<float>(float x) { return x; }
template <> __device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

// m*t + (1-m)*s with each product and the sum rounded separately (no FMA contraction), exactly as
// the PyTorch reference computes it, so the CUDA backend matches it bit for bit.
__device__ __forceinline__ float ema(float m, float om, float t, float s) {
  return __fadd_rn(__fmul_rn(m, t), __fmul_rn(om, s));
}

// A vector of N elements moved with one load/store (16 bytes for the wider of the two dtypes).
template <typename T, int N> struct alignas(sizeof(T) * N) Vec { T v[N]; };

template <typename T, typename S>
__global__ void __launch_bounds__(kThreads) ema_kernel(const int64_t* __restrict__ t_ptrs,
                                                       const int64_t* __restrict__ s_ptrs,
                                                       const int64_t* __restrict__ numels,
                                                       const int32_t* __restrict__ block_tensor,
                                                       const int64_t* __restrict__ block_start, int32_t num_pairs,
                                                       float m, float om, const float* __restrict__ m_device) {
  const int32_t pair = block_tensor[blockIdx.x];
  const int64_t start = block_start[blockIdx.x];
  if (pair < 0 || pair >= num_pairs) __trap();  // a malformed table: fail loudly, never touch a stray address
  const int64_t remaining = numels[pair] - start;
  if (start < 0 || remaining <= 0) __trap();
  const int len = remaining < kEmaBlockElems ? static_cast<int>(remaining) : kEmaBlockElems;
  T* __restrict__ t = reinterpret_cast<T*>(t_ptrs[pair]) + start;
  const S* __restrict__ s = reinterpret_cast<const S*>(s_ptrs[pair]) + start;
  // Addresses read from int64 tables compile to generic LD.E/ST.E; they are device (global)
  // memory by construction (tensor data_ptr()s), and saying so gives LDG/STG.E.128.
  __builtin_assume(__isGlobal(t));
  __builtin_assume(__isGlobal(s));
  if (m_device != nullptr) {  // the pair [m, 1 - m] of multi_tensor.momentum_args
    m = m_device[0];
    om = m_device[1];
  }
  constexpr int kVec = (16 / sizeof(T)) < (16 / sizeof(S)) ? (16 / sizeof(T)) : (16 / sizeof(S));
  using VT = Vec<T, kVec>;
  using VS = Vec<S, kVec>;
  const bool aligned = len == kEmaBlockElems && reinterpret_cast<uintptr_t>(t) % sizeof(VT) == 0 &&
                       reinterpret_cast<uintptr_t>(s) % sizeof(VS) == 0;
  if (aligned) {
#pragma unroll 4
    for (int i = threadIdx.x * kVec; i < kEmaBlockElems; i += kThreads * kVec) {
      VT tv = *reinterpret_cast<const VT*>(t + i);
      const VS sv = *reinterpret_cast<const VS*>(s + i);
#pragma unroll
      for (int j = 0; j < kVec; ++j) {
        tv.v[j] = from_float<T>(ema(m, om, to_float(tv.v[j]), to_float(sv.v[j])));
      }
      *reinterpret_cast<VT*>(t + i) = tv;
    }
  } else {
    for (int i = threadIdx.x; i < len; i += kThreads) {
      t[i] = from_float<T>(ema(m, om, to_float(t[i]), to_float(s[i])));
    }
  }
}

template <typename T, typename S>
cudaError_t launch(const int64_t* t_ptrs, const int64_t* s_ptrs, const int64_t* numels, const int32_t* block_tensor,
                   const int64_t* block_start, int64_t num_blocks, int32_t num_pairs, float m, float om,
                   const float* m_device, cudaStream_t stream) {
  // One block per table entry; the grid's x dimension holds up to 2^31 - 1 blocks (8 TiB of fp32).
  ema_kernel<T, S><<<static_cast<unsigned>(num_blocks), kThreads, 0, stream>>>(t_ptrs, s_ptrs, numels, block_tensor,
                                                                             block_start, num_pairs, m, om, m_device);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_for_student(int s_dtype, const int64_t* t_ptrs, const int64_t* s_ptrs, const int64_t* numels,
                               const int32_t* block_tensor, const int64_t* block_start, int64_t num_blocks,
                               int32_t num_pairs, float m, float om, const float* m_device, cudaStream_t stream) {
  switch (s_dtype) {
    case kFloat32: return launch<T, float>(t_ptrs, s_ptrs, numels, block_tensor, block_start, num_blocks, num_pairs, m, om, m_device, stream);
    case kFloat16: return launch<T, __half>(t_ptrs, s_ptrs, numels, block_tensor, block_start, num_blocks, num_pairs, m, om, m_device, stream);
    case kBFloat16: return launch<T, __nv_bfloat16>(t_ptrs, s_ptrs, numels, block_tensor, block_start, num_blocks, num_pairs, m, om, m_device, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace

cudaError_t ema_update_launch(const int64_t* t_ptrs, const int64_t* s_ptrs, const int64_t* numels,
                              const int32_t* block_tensor, const int64_t* block_start, int64_t num_blocks,
                              int32_t num_pairs, int t_dtype, int s_dtype, float m, float one_minus_m,
                              const float* m_device, cudaStream_t stream) {
  if (num_blocks <= 0) return cudaSuccess;
  if (num_blocks > 0x7fffffffLL) return cudaErrorInvalidConfiguration;
  switch (t_dtype) {
    case kFloat32: return launch_for_student<float>(s_dtype, t_ptrs, s_ptrs, numels, block_tensor, block_start, num_blocks, num_pairs, m, one_minus_m, m_device, stream);
    case kFloat16: return launch_for_student<__half>(s_dtype, t_ptrs, s_ptrs, numels, block_tensor, block_start, num_blocks, num_pairs, m, one_minus_m, m_device, stream);
    case kBFloat16: return launch_for_student<__nv_bfloat16>(s_dtype, t_ptrs, s_ptrs, numels, block_tensor, block_start, num_blocks, num_pairs, m, one_minus_m, m_device, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace sdae_fast
