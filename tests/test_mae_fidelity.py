"""MAE in float64 against models_mae.py semantics (facebookresearch/mae), the whole model: the same
weights and masking noise give the same loss and every gradient, to float64 rounding.

The official side is ``sdae_fast.bench.official.OfficialMAE`` (the compat engineer's re-statement
of models_mae.py: timm blocks, noise argsort masking, mask tokens appended then unshuffled, the
per-patch (normalised) pixel loss over the removed patches), loaded with the model's weights."""
import pytest
import torch

pytest.importorskip("timm")  # the official MAE builds on timm's Block and PatchEmbed

from sdae_fast.bench.official import OfficialMAE  # noqa: E402
from sdae_fast.models import build  # noqa: E402
from sdae_fast.testing import assert_close  # noqa: E402

BATCH = 3
# sdae_fast's MAE keeps the decoder in its own module; models_mae.py prefixes its names with "decoder_".
DECODER_NAMES = {"mask_token": "mask_token", "pos_embed": "decoder_pos_embed", "embed": "decoder_embed",
                 "blocks": "decoder_blocks", "norm": "decoder_norm", "pred": "decoder_pred"}


def official_name(name: str) -> str:
    part, _, rest = name.partition(".")
    if part == "encoder":
        return rest
    head, _, tail = rest.partition(".")
    return DECODER_NAMES[head] + ("." + tail if tail else "")


def official_twin(model, norm_pix_loss):
    """An OfficialMAE of the micro geometry holding ``model``'s weights, in float64."""
    enc = model.encoder
    official = OfficialMAE(img_size=32, patch_size=4, in_chans=1, embed_dim=64, depth=2, num_heads=2,
                           decoder_embed_dim=64, decoder_depth=1, decoder_num_heads=2, mlp_ratio=4.0,
                           norm_pix_loss=norm_pix_loss).double()
    assert enc.embed_dim == 64 and len(enc.blocks) == 2
    state = {official_name(k): v for k, v in model.state_dict().items()}
    official.load_state_dict(state, strict=True)
    return official


@pytest.mark.parametrize("norm_pix_loss", [True, False])
def test_whole_model_loss_and_every_gradient_match_models_mae_in_float64(norm_pix_loss):
    model = build("mae", "micro", depth=2, norm_pix_loss=norm_pix_loss, backend="torch").double()
    official = official_twin(model, norm_pix_loss)
    imgs = torch.randn(BATCH, 1, 32, 32, dtype=torch.float64)
    torch.manual_seed(7)
    loss = model(imgs)["loss"]
    torch.manual_seed(7)  # the same torch.rand(B, L) masking noise
    expected = official(imgs)[0]
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    theirs = dict(official.named_parameters())
    grads = torch.autograd.grad(loss, [model.get_parameter(n) for n in names])
    expected_grads = torch.autograd.grad(expected, [theirs[official_name(n)] for n in names])
    reduction = BATCH * 65 * 64  # the longest sum behind a gradient element
    assert loss.dtype == torch.float64
    assert_close(loss, expected, dtype=torch.float64, reduction=reduction, name="loss")
    for n, g, e in zip(names, grads, expected_grads):
        assert g.dtype == torch.float64, n
        assert_close(g, e, dtype=torch.float64, reduction=reduction, name=f"grad {n}")
