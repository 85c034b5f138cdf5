"""Out-of-bounds reads and writes, caught in the Triton interpreter (run by test_out_of_bounds.py).

The interpreter runs a kernel on the CPU tensors' own memory, so a load or store past a tensor's
end touches whatever lies there and usually passes; on a GPU the same access is an illegal
address, or silently reads a neighbour. Here every input of each fused op, and every output its
launcher allocates (``sdae_fast.alloc.PLACE``), is placed right against an inaccessible page, at
its end (``python tests/guard_pages.py end``) or at its start (``start``): an access past either
side faults, and faulthandler prints the kernel line. Sizes are odd so every last block is partial.

Linux only (mmap + mprotect through ctypes). Run as a subprocess: a fault ends the process.
"""
import ctypes
import faulthandler
import mmap
import os
import sys

os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402

import sdae_fast  # noqa: E402
import sdae_fast.alloc  # noqa: E402

PAGE = mmap.PAGESIZE
PROT_NONE = 0
_LIBC = ctypes.CDLL(None, use_errno=True)
_MAPPINGS = []  # kept alive for the whole run: the tensors view their memory


def placed(src: torch.Tensor, side: str) -> torch.Tensor:
    """A copy of ``src`` whose first (``side="start"``) or last (``"end"``) byte touches a page that
    cannot be read or written."""
    if src.numel() == 0:
        return src
    nbytes = src.numel() * src.element_size()
    pages = -(-nbytes // PAGE)
    mapping = mmap.mmap(-1, (pages + 2) * PAGE)  # guard page, data pages, guard page
    base = ctypes.addressof(ctypes.c_char.from_buffer(mapping))
    for guard in (base, base + (pages + 1) * PAGE):
        if _LIBC.mprotect(ctypes.c_void_p(guard), PAGE, PROT_NONE) != 0:
            raise OSError(ctypes.get_errno(), "mprotect failed")
    offset = PAGE if side == "start" else (pages + 1) * PAGE - nbytes
    out = torch.frombuffer(mapping, dtype=src.dtype, count=src.numel(), offset=offset).view(src.shape)
    out.copy_(src)
    _MAPPINGS.append(mapping)
    return out


def cases(side: str):
    """(name, function) pairs: each runs one op's forward and backward on placed tensors."""
    def leaf(*shape, grad=True):
        return placed(torch.randn(*shape), side).requires_grad_(grad)

    def ints(t):
        return placed(t, side)

    def backward(out):
        out.backward(placed(torch.randn_like(out), side) if out.dim() else None)

    def gather(prefix_rows, deterministic, repeat):
        b, length, m, groups, dim = 3, 11, 5, 2, 24
        index = torch.stack([torch.randperm(length)[:m] for _ in range(b * groups)])
        if repeat:
            index[:, -1] = index[:, 0]
        prefix = leaf(prefix_rows, dim) if prefix_rows else None
        backward(sdae_fast.gather_tokens(leaf(b, length, dim), ints(index), pos_embed=leaf(length, dim), prefix=prefix,
                                         groups=groups, backend="triton", deterministic=deterministic))

    def unshuffle(deterministic):
        b, length, keep, dim = 3, 11, 4, 24
        ids = torch.stack([torch.argsort(torch.randperm(length)) for _ in range(b)])
        backward(sdae_fast.unshuffle_tokens(leaf(b, 1 + keep, dim), ints(ids), leaf(dim), pos_embed=leaf(1 + length, dim),
                                            num_prefix=1, backend="triton", deterministic=deterministic))

    def topk_strided_qkv():
        """q, k, v as the strided views of one fused qkv projection (B, N, 3, H, d), as TopKAttention
        passes them: the last element of v is the buffer's last, the others end mid-buffer."""
        qkv = leaf(2, 19, 3, 2, 24).permute(2, 0, 3, 1, 4)
        backward(sdae_fast.topk_attention(qkv[0], qkv[1], qkv[2], 5, backend="triton"))

    def gather_strided():
        b, length, dim = 2, 9, 10
        x = leaf(b, length + 3, 2 * dim)[:, 2:length + 2, :dim]  # batch, row and feature strides
        index = ints(torch.randint(0, length, (2 * b, 4)))[::2]  # strided index rows
        backward(sdae_fast.gather_tokens(x, index, pos_embed=leaf(length, 2 * dim)[:, :dim], backend="triton"))

    def topk(multi_pass):
        from sdae_fast.kernels import topk_attention as kernel

        kernel.N_MAX_ONE_TILE = 16 if multi_pass else 1024  # 19 keys: the recomputing selection
        q, k, v = (leaf(1, 2, 19, 24) for _ in range(3))
        backward(sdae_fast.topk_attention(q, k, v, 5, backend="triton"))
        kernel.N_MAX_ONE_TILE = 1024

    def ema():
        teacher = [placed(torch.randn(n), side) for n in (5, 1000, 4099)]
        student = [placed(torch.randn(n), side) for n in (5, 1000, 4099)]
        sdae_fast.ema_update_(teacher, student, 0.9, backend="triton")
        sdae_fast.ema_update_(teacher, student, placed(torch.tensor(0.5, dtype=torch.float64), side), backend="triton")

    return [
        ("gather", lambda: gather(1, False, False)),
        ("gather, deterministic, repeats", lambda: gather(2, True, True)),
        ("gather, no prefix", lambda: gather(0, False, False)),
        ("unshuffle", lambda: unshuffle(False)),
        ("unshuffle, deterministic", lambda: unshuffle(True)),
        ("topk_attention", lambda: topk(False)),
        ("topk_attention, multi-pass selection", lambda: topk(True)),
        ("topk_attention, strided qkv views", topk_strided_qkv),
        ("gather, strided inputs", gather_strided),
        ("dino_loss", lambda: backward(sdae_fast.dino_loss(leaf(5 * 3, 203), placed(torch.randn(2 * 3, 203), side),
                                                           placed(torch.randn(203), side), backend="triton"))),
        ("homologous_contrastive_loss", lambda: backward(sdae_fast.homologous_contrastive_loss(
            leaf(2, 19, 40), ints(torch.randint(0, 3, (2, 19))), backend="triton"))),
        ("cosine_loss, paper axes", lambda: backward(sdae_fast.cosine_loss(
            leaf(5, 7, 13), placed(torch.randn(5, 7, 13), side), backend="triton"))),
        ("cosine_loss, official axes", lambda: backward(sdae_fast.cosine_loss(
            leaf(5, 7, 13), placed(torch.randn(5, 7, 13), side), dim=1, backend="triton"))),
        ("masked_mse_loss", lambda: backward(sdae_fast.masked_mse_loss(
            leaf(3, 7, 13), placed(torch.randn(3, 7, 13), side), placed((torch.rand(3, 7) > 0.5).float(), side),
            backend="triton"))),
        ("ema_update_", ema),
    ]


def main(side: str) -> None:
    faulthandler.enable()
    torch.manual_seed(0)
    sdae_fast.alloc.PLACE = lambda out: placed(out, side)
    for name, run in cases(side):
        print(f"{name} ...", flush=True)
        run()
        sdae_fast.check_errors()
    print("all ok", flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
