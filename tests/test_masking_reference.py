"""The masking references (SPEC §1) against hand-computed cases and MAE's official code re-derived here."""
import pytest
import torch

from sdae_fast import reference
from sdae_fast.ops import masking


# ---------------------------------------------------------------- MAE's official code (models_mae.py)
def mae_random_masking(x, mask_ratio, noise):
    """MAE ``random_masking`` as published, with the noise passed in."""
    n, length, dim = x.shape
    len_keep = int(length * (1 - mask_ratio))
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    ids_keep = ids_shuffle[:, :len_keep]
    x_masked = torch.gather(x, dim=1, index=ids_keep.unsqueeze(-1).repeat(1, 1, dim))
    mask = torch.ones([n, length], device=x.device)
    mask[:, :len_keep] = 0
    mask = torch.gather(mask, dim=1, index=ids_restore)
    return x_masked, mask, ids_restore


def mae_encoder_input(x, pos_embed_full, cls_token, mask_ratio, noise):
    """MAE ``forward_encoder`` up to the blocks: +pos, mask, prepend cls + pos[0]."""
    x = x + pos_embed_full[:, 1:, :]
    x, mask, ids_restore = mae_random_masking(x, mask_ratio, noise)
    cls = cls_token + pos_embed_full[:, :1, :]
    return torch.cat((cls.expand(x.shape[0], -1, -1), x), dim=1), mask, ids_restore


def mae_decoder_input(x, ids_restore, mask_token, decoder_pos_embed):
    """MAE ``forward_decoder`` up to the blocks (after decoder_embed)."""
    mask_tokens = mask_token.repeat(x.shape[0], ids_restore.shape[1] + 1 - x.shape[1], 1)
    x_ = torch.cat([x[:, 1:, :], mask_tokens], dim=1)
    x_ = torch.gather(x_, dim=1, index=ids_restore.unsqueeze(-1).repeat(1, 1, x.shape[2]))
    x = torch.cat([x[:, :1, :], x_], dim=1)
    return x + decoder_pos_embed


# ---------------------------------------------------------------- hand-computed cases
def test_gather_hand_computed():
    x = torch.arange(2 * 4 * 2, dtype=torch.float32).reshape(2, 4, 2)  # x[b, l] = [8b + 2l, 8b + 2l + 1]
    pos = torch.tensor([[0.0, 0.5], [10.0, 10.5], [20.0, 20.5], [30.0, 30.5]])
    prefix = torch.tensor([[-1.0, -2.0]])
    index = torch.tensor([[3, 0], [1, 1]])
    out = reference.gather_tokens(x, index, pos_embed=pos, prefix=prefix)
    expected = torch.tensor([
        [[-1.0, -2.0], [6 + 30.0, 7 + 30.5], [0 + 0.0, 1 + 0.5]],
        [[-1.0, -2.0], [10 + 10.0, 11 + 10.5], [10 + 10.0, 11 + 10.5]],
    ])
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


def test_gather_groups_hand_computed():
    x = torch.tensor([[[1.0], [2.0], [3.0]], [[4.0], [5.0], [6.0]]])  # B=2, L=3, D=1
    index = torch.tensor([[0], [2], [1], [1]])  # groups=2: rows 0,1 read image 0; rows 2,3 image 1
    out = reference.gather_tokens(x, index, groups=2)
    torch.testing.assert_close(out, torch.tensor([[[1.0]], [[3.0]], [[5.0]], [[5.0]]]), rtol=0, atol=0)
    # backward: the repeated row of image 1 receives both grads
    x.requires_grad_(True)
    reference.gather_tokens(x, index, groups=2).sum().backward()
    torch.testing.assert_close(x.grad, torch.tensor([[[1.0], [0.0], [1.0]], [[0.0], [2.0], [0.0]]]))


def test_unshuffle_hand_computed():
    # B=1, L=4, K=2, one prefix token; ids_restore says position 0 <- visible 1, 2 <- visible 0.
    x_vis = torch.tensor([[[100.0], [1.0], [2.0]]])
    ids_restore = torch.tensor([[1, 3, 0, 2]])
    mask_token = torch.tensor([-7.0])
    pos = torch.tensor([[0.0], [0.1], [0.2], [0.3], [0.4]])
    out = reference.unshuffle_tokens(x_vis, ids_restore, mask_token, pos_embed=pos, num_prefix=1)
    expected = torch.tensor([[[100.0], [2.1], [-6.8], [1.3], [-6.6]]])
    torch.testing.assert_close(out, expected)


def test_random_masking_hand_computed():
    noise = torch.tensor([[0.9, 0.1, 0.5, 0.3]])
    ids = reference.random_masking(1, 4, 0.5, noise=noise)
    assert ids.ids_keep.tolist() == [[1, 3]]
    assert ids.ids_masked.tolist() == [[2, 0]]
    assert ids.ids_restore.tolist() == [[3, 0, 2, 1]]
    assert ids.mask.tolist() == [[1.0, 0.0, 1.0, 0.0]]


# ---------------------------------------------------------------- against MAE
@pytest.mark.parametrize("B,L,D,ratio", [(2, 16, 8, 0.75), (3, 196, 12, 0.75), (1, 10, 5, 0.5), (4, 9, 3, 0.0)])
def test_random_masking_reproduces_mae(B, L, D, ratio):
    noise = torch.rand(B, L)
    x = torch.randn(B, L, D)
    x_masked, mask, ids_restore = mae_random_masking(x, ratio, noise)
    ids = masking.random_masking(B, L, ratio, noise=noise)
    assert torch.equal(ids.ids_restore, ids_restore)
    assert torch.equal(ids.mask, mask)
    assert torch.equal(reference.gather_tokens(x, ids.ids_keep), x_masked)
    # ids_keep ∪ ids_masked is every position once; the mask marks exactly the masked ones
    both = torch.cat([ids.ids_keep, ids.ids_masked], 1).sort(1).values
    assert torch.equal(both, torch.arange(L).expand(B, L))
    assert torch.equal(mask.gather(1, ids.ids_masked), torch.ones_like(ids.ids_masked, dtype=mask.dtype))


def test_random_masking_generator_and_errors():
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    a, b = masking.random_masking(2, 8, 0.75, generator=g1), masking.random_masking(2, 8, 0.75, generator=g2)
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    with pytest.raises(ValueError, match="mask_ratio"):
        masking.random_masking(2, 8, 1.0)
    with pytest.raises(ValueError, match="noise must have shape"):
        masking.random_masking(2, 8, 0.5, noise=torch.rand(2, 7))


@pytest.mark.parametrize("B,L,D", [(2, 16, 8), (3, 196, 6)])
def test_encoder_input_matches_mae(B, L, D):
    noise, x = torch.rand(B, L), torch.randn(B, L, D, dtype=torch.float64)
    pos_full, cls = torch.randn(1, L + 1, D, dtype=torch.float64), torch.randn(1, 1, D, dtype=torch.float64)
    expected, _, _ = mae_encoder_input(x, pos_full, cls, 0.75, noise)
    ids = reference.random_masking(B, L, 0.75, noise=noise)
    prefix = (cls + pos_full[:, :1]).reshape(1, D)
    out = reference.gather_tokens(x, ids.ids_keep, pos_embed=pos_full[0, 1:], prefix=prefix)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)  # fp64: one add each, same order


@pytest.mark.parametrize("B,L,D,ratio", [(2, 16, 8, 0.75), (3, 196, 6, 0.75), (2, 5, 4, 0.4)])
def test_decoder_input_matches_mae(B, L, D, ratio):
    noise = torch.rand(B, L)
    ids = reference.random_masking(B, L, ratio, noise=noise)
    keep = ids.ids_keep.shape[1]
    x = torch.randn(B, 1 + keep, D, dtype=torch.float64)
    mask_token, pos = torch.randn(1, 1, D, dtype=torch.float64), torch.randn(1, L + 1, D, dtype=torch.float64)
    expected = mae_decoder_input(x, ids.ids_restore, mask_token, pos)
    out = reference.unshuffle_tokens(x, ids.ids_restore, mask_token.reshape(D), pos_embed=pos[0], num_prefix=1)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


def test_decoder_input_public_op_accepts_mae_parameter_shape():
    B, L, D = 2, 8, 4
    ids = masking.random_masking(B, L, 0.75, noise=torch.rand(B, L))
    x = torch.randn(B, 1 + 2, D)
    mask_token, pos = torch.randn(1, 1, D), torch.randn(1, L + 1, D)
    out = masking.unshuffle_tokens(x, ids.ids_restore, mask_token, pos_embed=pos[0], num_prefix=1)
    torch.testing.assert_close(out, mae_decoder_input(x, ids.ids_restore, mask_token, pos))


def test_sdae_multifold_teacher_views():
    """SdAE: the masked positions split into F folds, each a teacher view with its own cls."""
    B, L, D, F = 2, 16, 6, 3
    ratio = 0.75  # keep 4, mask 12 = 3 folds of 4
    ids = reference.random_masking(B, L, ratio, noise=torch.rand(B, L))
    masked = ids.ids_masked
    per_fold = masked.shape[1] // F
    x, pos = torch.randn(B, L, D, dtype=torch.float64), torch.randn(L, D, dtype=torch.float64)
    cls = torch.randn(1, D, dtype=torch.float64)
    out = reference.gather_tokens(x, masked.reshape(B * F, per_fold), pos_embed=pos, prefix=cls, groups=F)
    assert out.shape == (B * F, 1 + per_fold, D)
    for b in range(B):
        for f in range(F):
            fold = masked[b, f * per_fold:(f + 1) * per_fold]
            view = torch.cat([cls, x[b, fold] + pos[fold]])
            torch.testing.assert_close(out[b * F + f], view, rtol=0, atol=0)


def test_reference_gradients_against_autograd_of_mae_code():
    B, L, D = 2, 8, 3
    noise = torch.rand(B, L)
    ids = reference.random_masking(B, L, 0.75, noise=noise)
    x = torch.randn(B, 1 + 2, D, dtype=torch.float64, requires_grad=True)
    mt = torch.randn(1, 1, D, dtype=torch.float64, requires_grad=True)
    pos = torch.randn(1, L + 1, D, dtype=torch.float64, requires_grad=True)
    g = torch.randn(B, L + 1, D, dtype=torch.float64)
    want = torch.autograd.grad(mae_decoder_input(x, ids.ids_restore, mt, pos), (x, mt, pos), g)
    out = reference.unshuffle_tokens(x, ids.ids_restore, mt.reshape(D), pos_embed=pos[0], num_prefix=1)
    got = torch.autograd.grad(out, (x, mt, pos), g)
    for a, e in zip(got, want):
        torch.testing.assert_close(a, e)


def test_benchmark_naive_variants_compute_the_op():
    """The bench's "naive" variants (MAE's code) compute what the fused op computes."""
    from sdae_fast.bench.masking import _mae_decoder_input as bench_decoder
    from sdae_fast.bench.masking import _mae_encoder_input as bench_encoder

    B, L, D = 3, 196, 8
    ids = reference.random_masking(B, L, 0.75, noise=torch.rand(B, L))
    x, pos, prefix = (torch.randn(*s, dtype=torch.float64) for s in ((B, L, D), (L, D), (1, D)))
    torch.testing.assert_close(bench_encoder(x, ids.ids_keep, pos, prefix),
                               reference.gather_tokens(x, ids.ids_keep, pos_embed=pos, prefix=prefix), rtol=0, atol=0)
    xv, mt, dpos = (torch.randn(*s, dtype=torch.float64) for s in ((B, 50, D), (D,), (L + 1, D)))
    torch.testing.assert_close(bench_decoder(xv, ids.ids_restore, mt, dpos),
                               reference.unshuffle_tokens(xv, ids.ids_restore, mt, pos_embed=dpos, num_prefix=1),
                               rtol=0, atol=0)
