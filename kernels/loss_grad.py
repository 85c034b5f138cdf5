"""The backward of a loss whose forward already wrote d loss / d pred (Liger-style): scale only.

fp16 needs care. The gradient of a mean over many elements is tiny (~1/(V·|p|) for the cosine
loss, 2(p - t)/(P·Σmask) for the masked MSE): for real batches it lands in fp16's subnormals, and
GradScaler's upstream scale (often 2^16) applied afterwards cannot restore the lost bits, whereas
autograd of the reference multiplies in fp32 and rounds once. So for fp16 the kernel stores the
gradient WITHOUT the mean's 1/count factor (an O(1/|p|) or O(|p - t|/P) value, well inside fp16's
normal range) and backward applies count⁻¹ · grad_output in one fp32-accurate multiply.
bf16 shares fp32's exponent range and fp32 is fp32: they store the final unit gradient.
"""
import torch


def defers_mean_factor(dtype: torch.dtype) -> bool:
    """Whether the forward leaves the 1/count factor of the mean to the backward (fp16 only)."""
    return dtype == torch.float16


def scale_saved_grad(grad: torch.Tensor, grad_output: torch.Tensor, deferred_factor=None) -> torch.Tensor:
    """``grad · grad_output`` (· ``deferred_factor`` when the forward left the mean's factor out).

    Always one multiply by the device scalar, even for a unit upstream gradient: testing for 1.0
    on the host (Liger-Kernel's shortcut) would cost a device->host sync every step and a graph
    break under torch.compile. The scale stays an fp32 0-dim tensor, so the product is computed in
    fp32 and rounded once to grad's dtype.
    """
    if deferred_factor is None:
        return grad * grad_output.float()
    return grad * (grad_output.float() * deferred_factor)
