"""The backward of a loss whose forward already wrote d loss / d pred (Liger-style): scale only.

fp16 needs care in both directions. The gradient of a mean over many elements is tiny
(~1/(V·|p|) for the cosine loss, 2(p - t)/(P·Σmask) for the masked MSE): for real batches it lands
in fp16's subnormals, and GradScaler's upstream scale (often 2^16) applied afterwards cannot
restore the lost bits, whereas autograd of the reference multiplies in fp32 and rounds once. But
leaving the mean's 1/count out of the stored value overflows instead wherever the gradient is
large (a pred vector of norm 1e-6, |p - t| near fp16's max): count times a finite gradient.
No single scale for the whole tensor serves both, and a data-dependent one would need the
tensor's max before the store (a second pass, or a host sync).

So for fp16 every vector (cosine) or patch row (MSE), which a program holds whole in registers,
is stored with its own power of two: the kernel computes the final fp32 unit gradient, scales the
vector so that its largest |element| lands in [2^14, 2^15) (exact: a power of two), rounds to fp16
once and writes the inverse power (one fp32 per vector) next to it. The backward multiplies
``grad16 · (2^-k · grad_output)`` in fp32 and rounds once to fp16, so the result under- or
overflows only where the true ``gradient · grad_output`` does, as the reference's. The stored
values lose nothing but elements more than 2^28 below their vector's max (they go subnormal),
which is far below fp16's precision at that max. Memory: 4 bytes per vector on top of the fp16
gradient (storing it in fp32 instead would cost 2 more bytes per element, in the forward's
writes, the backward's reads and the activation memory held until the backward).
bf16 shares fp32's exponent range and fp32 is fp32: they store the final unit gradient, with the
0-dim factor 1.
"""
import torch
import triton
import triton.language as tl


def scales_per_vector(dtype: torch.dtype) -> bool:
    """Whether the forward stores the gradient with a power of two per vector (fp16 only)."""
    return dtype == torch.float16


@triton.jit
def pow2_normalizer(amax):
    """(2^k, 2^-k), fp32, with ``amax · 2^k`` in [2^14, 2^15): exact powers of two from the bits.

    ``amax`` (>= 0) is a vector's largest |gradient|. 0, fp32 subnormals, inf and NaN get k = 0
    (nothing to gain, and an inf must not flush the vector's finite elements to 0); k <= 126
    keeps 2^-k normal. The fp16 store of ``g · 2^k`` then stays below 2^15, far from overflow.
    """
    e = (amax.to(tl.int32, bitcast=True) >> 23) & 0xFF  # biased exponent: amax in [2^(e-127), 2^(e-126))
    k = tl.where((e == 0) | (e == 255), 0, 141 - e)  # 14 - (e - 127)
    k = tl.minimum(k, 126)
    up = ((k + 127) << 23).to(tl.float32, bitcast=True)
    down = ((127 - k) << 23).to(tl.float32, bitcast=True)
    return up, down


def scale_saved_grad(grad: torch.Tensor, grad_output: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """``grad · factor · grad_output`` in fp32, rounded once to grad's dtype.

    ``factor`` is the 0-dim 1 or, for fp16, the inverse powers of two (one per vector; DINO's one
    per tensor, from a bound, shaped (1, 1) so that the multiply runs in fp32), shaped to broadcast
    against grad. Always one multiply by device scalars, even for a unit upstream
    gradient: testing for 1.0 on the host (Liger-Kernel's shortcut) would cost a device->host sync
    every step and a graph break under torch.compile.
    """
    scale = factor * grad_output.float()
    if scale.dim() == 0:
        # A 0-dim scale does not promote grad: grad's dtype out (fp32; or bf16, where the scale is read
        # as bf16 first: exact for the usual upstream 1 or power of two).
        return grad * scale
    # Straight into grad's dtype: no full-size fp32 temporary at the start of the backward.
    return torch.mul(grad, scale, out=torch.empty_like(grad))
