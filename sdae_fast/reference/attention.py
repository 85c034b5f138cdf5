"""Top-K (homologous) attention of MixedAE (SPEC §3), with the full score matrix."""

from .stats import accumulation_dtype, without_autocast


@without_autocast
def topk_attention(q, k, v, topk: int, *, scale=None):
    """Each query attends to its ``topk`` highest-scoring keys; ties at the threshold are all kept.

    q, k, v (B, H, N, d). ``topk >= N`` is dense attention. Gradients treat the kept set as a
    constant, which is what autograd of this masked-fill gives.
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    acc = accumulation_dtype(q, k, v)
    s = (q.to(acc) @ k.to(acc).transpose(-2, -1)) * scale
    if topk < k.shape[-2]:
        tau = s.topk(topk, dim=-1).values[..., -1:]  # the topk-th largest score of each row
        s = s.masked_fill(s < tau, float("-inf"))
    return (s.softmax(dim=-1) @ v.to(acc)).to(q.dtype)
