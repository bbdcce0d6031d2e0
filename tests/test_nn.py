import dataclasses
import math

import pytest
import torch

from vlp.config import TextConfig, VisionConfig
from vlp.errors import ConfigError
from vlp.nn import (
    Attention,
    AttentionalPooler,
    PatchDropout,
    TextTransformer,
    Transformer,
    VisionTransformer,
    causal_mask,
    pool_argmax,
    pool_eos,
    pool_mean,
    prefix_mask,
    resize_pos_embed,
)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _pair(**kwargs):
    fused = Attention(32, 4, **kwargs)
    manual = Attention(32, 4, fused=False, **kwargs)
    manual.load_state_dict(fused.state_dict())
    return fused.eval(), manual.eval()


def test_fused_attention_equals_manual_self_causal_and_padding():
    fused, manual = _pair()
    x = torch.randn(3, 7, 32)
    torch.testing.assert_close(fused(x), manual(x), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fused(x, is_causal=True), manual(x, is_causal=True),
                               atol=1e-5, rtol=1e-5)
    pad = torch.tensor([[1] * 7, [1] * 4 + [0] * 3, [1] * 2 + [0] * 5]).bool()
    mask = pad[:, None, None, :]
    torch.testing.assert_close(fused(x, mask=mask), manual(x, mask=mask), atol=1e-5, rtol=1e-5)


def test_fused_attention_equals_manual_cross():
    fused, manual = _pair(context_dim=48)
    x, ctx = torch.randn(2, 5, 32), torch.randn(2, 9, 48)
    torch.testing.assert_close(fused(x, ctx), manual(x, ctx), atol=1e-5, rtol=1e-5)


def test_padding_keys_do_not_change_real_outputs():
    attn = Attention(32, 4).eval()
    x = torch.randn(1, 4, 32)
    padded = torch.cat([x, torch.randn(1, 3, 32)], dim=1)
    mask = torch.tensor([[1, 1, 1, 1, 0, 0, 0]]).bool()[:, None, None, :]
    torch.testing.assert_close(attn(padded, mask=mask)[:, :4], attn(x), atol=1e-5, rtol=1e-5)


def test_fully_masked_rows_do_not_give_nan():
    attn = Attention(32, 4).eval()
    x = torch.randn(1, 4, 32)
    pad = torch.tensor([[0, 0, 1, 1]]).bool()[:, None, None, :]  # left padding
    out = attn(x, mask=pad, is_causal=True)
    assert torch.isfinite(out).all()


def test_causal_and_prefix_masks():
    m = causal_mask(2, 5)
    assert m.tolist() == [[True, True, True, True, False], [True] * 5]
    p = prefix_mask(torch.tensor([2, 0]), 4)[:, 0]
    assert p[0].tolist() == [[True, True, False, False], [True, True, False, False],
                             [True, True, True, False], [True, True, True, True]]
    assert torch.equal(p[1], causal_mask(4, 4))


@pytest.mark.parametrize("cross", [False, True])
def test_kv_cache_decoding_equals_full_forward(cross):
    ctx_dim = 24 if cross else None
    stack = Transformer(32, 3, 4, causal=True, context_dim=ctx_dim).eval()
    x = torch.randn(2, 9, 32)
    context = torch.randn(2, 6, 24) if cross else None
    full = stack(x, context=context)
    # prompt of 4 tokens, then one token at a time
    out, caches = stack.forward_cached(x[:, :4], None, context=context)
    steps = [out]
    for t in range(4, 9):
        out, caches = stack.forward_cached(x[:, t : t + 1], caches, context=context)
        steps.append(out)
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)
    assert caches[0].self_kv.key.shape == (2, 4, 9, 8)


def test_kv_cache_with_padding_mask_equals_full_forward():
    stack = Transformer(32, 2, 4, causal=True).eval()
    x = torch.randn(2, 6, 32)
    pad = torch.tensor([[0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]]).bool()  # row 0 left-padded
    full = stack(x, mask=pad[:, None, None, :])
    out, caches = stack.forward_cached(x[:, :3], None, mask=pad[:, None, None, :3])
    rest = []
    for t in range(3, 6):
        o, caches = stack.forward_cached(x[:, t : t + 1], caches, mask=pad[:, None, None, : t + 1])
        rest.append(o)
    got = torch.cat([out] + rest, dim=1)
    torch.testing.assert_close(got[:, 1:], full[:, 1:], atol=1e-5, rtol=1e-5)


def test_grad_checkpointing_matches_plain():
    stack = Transformer(32, 2, 4, causal=True)
    x = torch.randn(2, 5, 32, requires_grad=True)
    plain = stack(x)
    plain.sum().backward()
    grad_plain = x.grad.clone()
    x.grad = None
    stack.grad_checkpointing = True
    ckpt = stack(x)
    ckpt.sum().backward()
    torch.testing.assert_close(ckpt, plain)
    torch.testing.assert_close(x.grad, grad_plain)


def _vit(**kw):
    cfg = VisionConfig(image_size=32, patch_size=8, width=32, layers=2, heads=4, **kw)
    return VisionTransformer(cfg, output_dim=16)


def test_vit_shapes_and_wrong_image_size():
    vit = _vit()
    assert vit.forward_features(torch.randn(2, 3, 32, 32)).shape == (2, 17, 32)
    assert vit(torch.randn(2, 3, 32, 32)).shape == (2, 16)
    with pytest.raises(ConfigError, match="32, 32"):
        vit(torch.randn(2, 3, 48, 48))


def test_pos_embed_interpolation_identity_and_new_size():
    pos = torch.randn(1 + 16, 8)
    assert torch.equal(resize_pos_embed(pos, 4), pos)
    bigger = resize_pos_embed(pos, 6)
    assert bigger.shape == (37, 8) and torch.equal(bigger[0], pos[0])
    vit = _vit().eval()
    vit.set_image_size(48)
    assert vit(torch.randn(1, 3, 48, 48)).shape == (1, 16)


def test_patch_dropout_keeps_cls_and_fraction():
    drop = PatchDropout(0.5).train()
    x = torch.randn(2, 17, 4)
    out = drop(x)
    assert out.shape == (2, 9, 4) and torch.equal(out[:, 0], x[:, 0])
    assert torch.equal(drop.eval()(x), x)


def test_text_tower_causal_ignores_padding_and_bidirectional_masks_it():
    cfg = TextConfig(vocab_size=50, context_length=8, width=32, layers=2, heads=4)
    tower = TextTransformer(cfg, output_dim=16).eval()
    ids = torch.tensor([[1, 7, 8, 2, 0, 0, 0, 0]])
    other_pad = torch.tensor([[1, 7, 8, 2, 9, 9, 9, 9]])
    torch.testing.assert_close(tower(ids), tower(other_pad))
    bi = TextTransformer(TextConfig(vocab_size=50, context_length=8, width=32, layers=2, heads=4,
                                    causal=False, pool="mean"), output_dim=16).eval()
    torch.testing.assert_close(bi(ids), bi(other_pad))
    with pytest.raises(ConfigError, match="context_length"):
        tower(torch.ones(1, 9, dtype=torch.long))


def test_pooling_helpers():
    tokens = torch.arange(2 * 4 * 1, dtype=torch.float).view(2, 4, 1)
    ids = torch.tensor([[1, 5, 2, 0], [1, 5, 6, 7]])
    assert pool_eos(tokens, ids, eos_id=2).flatten().tolist() == [2.0, 7.0]  # no eos: last
    assert pool_argmax(tokens, ids).flatten().tolist() == [1.0, 7.0]
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]]).bool()
    assert pool_mean(tokens, mask).flatten().tolist() == [0.5, 5.5]


def test_attentional_pooler_constant_weights():
    pooler = AttentionalPooler(8, 12, n_queries=3, heads=2)
    for p in pooler.parameters():
        torch.nn.init.constant_(p, 1.0)
    out = pooler(torch.randn(2, 5, 12))
    assert out.shape == (2, 3, 8)
    # all-ones weights: LN(context) = z + 1 with sum(z) = 0, so every value is 12 + 1 = 13;
    # attention averages values -> 13; output proj: 8 * 13 + 1 = 105
    torch.testing.assert_close(out, torch.full((2, 3, 8), 105.0))
    assert math.isclose(out.mean().item(), 105.0)


def test_trimming_trailing_padding_keeps_pooled_output():
    cfg = TextConfig(vocab_size=50, context_length=12, width=32, layers=2, heads=4)
    tower = TextTransformer(cfg, output_dim=16).eval()
    ids = torch.tensor([[1, 7, 8, 2] + [0] * 8, [1, 7, 8, 9, 10, 2] + [0] * 6])
    trimmed, _ = tower.trim_padding(ids)
    assert trimmed.shape == (2, 6)
    full = tower.forward_head(tower.pool(tower.forward_features(ids), ids))
    torch.testing.assert_close(tower(ids), full, atol=1e-6, rtol=1e-6)
    no_eos = torch.tensor([[1, 7, 8, 9] + [0] * 8])  # no eos: nothing is padding
    assert tower.trim_padding(no_eos)[0].shape == (1, 12)


def test_drop_path_drops_whole_samples_and_keeps_the_expectation():
    from vlp.nn.transformer import DropPath

    layer = DropPath(0.3).train()
    torch.manual_seed(0)
    out = layer(torch.ones(20000, 4, 3))
    dropped = (out == 0).all(dim=(1, 2))
    kept = torch.isclose(out, torch.full_like(out, 1 / 0.7))
    assert ((out == 0) | kept).all() and (kept.all(dim=(1, 2)) | dropped).all()  # per sample
    assert abs(dropped.float().mean().item() - 0.3) < 0.02
    assert abs(out.mean().item() - 1.0) < 0.03
    layer.eval()
    x = torch.randn(5, 4, 3)
    assert torch.equal(layer(x), x)
    with pytest.raises(ConfigError, match="drop_path"):
        DropPath(1.0)


def test_drop_path_rises_over_the_stack_and_only_acts_in_training():
    from vlp.config import VisionConfig
    from vlp.nn import VisionTransformer
    from vlp.nn.transformer import DropPath

    config = VisionConfig(image_size=32, patch_size=16, width=32, layers=4, heads=2,
                          drop_path=0.3)
    vit = VisionTransformer(config, output_dim=8)
    rates = [block.drop_path.p if isinstance(block.drop_path, DropPath) else 0.0
             for block in vit.transformer.blocks]
    assert rates == pytest.approx([0.0, 0.1, 0.2, 0.3])
    plain = VisionTransformer(dataclasses.replace(config, drop_path=0.0), output_dim=8)
    plain.load_state_dict(vit.state_dict())  # no parameters of its own
    pixels = torch.randn(6, 3, 32, 32)
    torch.testing.assert_close(vit.eval()(pixels), plain.eval()(pixels))
    vit.train(), plain.train()
    torch.manual_seed(1)
    assert not torch.allclose(vit(pixels), plain(pixels))
