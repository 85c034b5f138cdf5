// Multi-tensor EMA update: t <- m*t + (1-m)*s over every (teacher, student) pair of one dtype group
// in one launch. Plain CUDA (no torch headers) so CI can compile it with nvcc alone.
#pragma once
#include <cstdint>
#include <cuda_runtime.h>

namespace sdae_fast {

// Must match sdae_fast/multi_tensor.py: DTYPE_CODES and BLOCK_ELEMS.
enum DTypeCode : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };
constexpr int kEmaBlockElems = 4096;

// Block b works on pair block_tensor[b] (of num_pairs), elements [block_start[b], block_start[b] + 4096);
// a pair index or start outside the tables traps (a device-side error, as torch's index asserts).
// m_device, when not null, is the fp32 device pair [m, 1 - m] read in the kernel (no host sync);
// otherwise m and one_minus_m are used as given (rounded to fp32 as the reference rounds them).
cudaError_t ema_update_launch(const int64_t* t_ptrs, const int64_t* s_ptrs, const int64_t* numels,
                              const int32_t* block_tensor, const int64_t* block_start, int64_t num_blocks,
                              int32_t num_pairs, int t_dtype, int s_dtype, float m, float one_minus_m,
                              const float* m_device, cudaStream_t stream);

}  // namespace sdae_fast
