// Torch binding of the multi-tensor EMA launcher: unpacks the block tables and calls it on the
// current stream. The tables are built (and cached) by sdae_fast/multi_tensor.py.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/extension.h>

#include "ema.cuh"

namespace {

void ema_update(const at::Tensor& t_ptrs, const at::Tensor& s_ptrs, const at::Tensor& numels,
                const at::Tensor& block_tensor, const at::Tensor& block_start, int64_t t_dtype, int64_t s_dtype,
                double m, double one_minus_m, const c10::optional<at::Tensor>& m_device) {
  for (const auto* t : {&t_ptrs, &s_ptrs, &numels, &block_start}) {
    TORCH_CHECK(t->is_cuda() && t->scalar_type() == at::kLong && t->is_contiguous(), "tables must be contiguous int64 CUDA tensors");
  }
  TORCH_CHECK(block_tensor.is_cuda() && block_tensor.scalar_type() == at::kInt && block_tensor.is_contiguous(),
              "block_tensor must be a contiguous int32 CUDA tensor");
  for (const auto* t : {&s_ptrs, &numels, &block_tensor, &block_start}) {
    TORCH_CHECK(t->device() == t_ptrs.device(), "EMA tables must be on one device, got ", t->device(), " and ",
                t_ptrs.device());
  }
  // Shapes only (the values live on the device: reading them would sync); the kernel traps on a
  // block whose pair index or start lies outside the tables.
  TORCH_CHECK(t_ptrs.dim() == 1 && s_ptrs.sizes() == t_ptrs.sizes() && numels.sizes() == t_ptrs.sizes(),
              "t_ptrs, s_ptrs and numels must be 1-d tables of equal length, got ", t_ptrs.sizes(), ", ",
              s_ptrs.sizes(), " and ", numels.sizes());
  TORCH_CHECK(block_tensor.dim() == 1 && block_start.sizes() == block_tensor.sizes(),
              "block_tensor and block_start must be 1-d tables of equal length, got ", block_tensor.sizes(), " and ",
              block_start.sizes());
  TORCH_CHECK(block_tensor.numel() == 0 || t_ptrs.numel() > 0, "EMA blocks without pairs");
  TORCH_CHECK(t_ptrs.numel() <= INT32_MAX, "at most 2^31 - 1 pairs (block_tensor is int32), got ", t_ptrs.numel());
  for (const int64_t code : {t_dtype, s_dtype}) {
    TORCH_CHECK(code >= sdae_fast::kFloat32 && code <= sdae_fast::kBFloat16, "unknown EMA dtype code ", code);
  }
  const float* m_ptr = nullptr;
  if (m_device.has_value()) {
    TORCH_CHECK(m_device->is_cuda() && m_device->scalar_type() == at::kFloat && m_device->numel() == 2 &&
                    m_device->is_contiguous(),
                "momentum must be the contiguous fp32 CUDA pair [m, 1 - m]");
    // The kernel reads it on the tables' device: a tensor on another GPU would be an illegal address.
    TORCH_CHECK(m_device->device() == t_ptrs.device(), "momentum tensor is on ", m_device->device(),
                ", the EMA tables on ", t_ptrs.device());
    m_ptr = m_device->data_ptr<float>();
  }
  const c10::cuda::CUDAGuard guard(t_ptrs.device());
  const cudaError_t err = sdae_fast::ema_update_launch(
      t_ptrs.data_ptr<int64_t>(), s_ptrs.data_ptr<int64_t>(), numels.data_ptr<int64_t>(),
      block_tensor.data_ptr<int32_t>(), block_start.data_ptr<int64_t>(), block_tensor.numel(),
      static_cast<int32_t>(t_ptrs.numel()), static_cast<int>(t_dtype),
      static_cast<int>(s_dtype), static_cast<float>(m), static_cast<float>(one_minus_m), m_ptr,
      at::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "sdae_fast EMA kernel failed: ", cudaGetErrorString(err));
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("ema_update", &ema_update, "Multi-tensor EMA update over cached block tables");
}
