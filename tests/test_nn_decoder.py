import pytest
import torch

from vlp.config import TextConfig
from vlp.nn.decoder import CrossDecoder
from vlp.nn.text import ClsTextTransformer, appended_cls_mask

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def test_appended_cls_mask_by_hand():
    real = torch.tensor([[True, True, False]])
    mask = appended_cls_mask(real)[0, 0].int().tolist()
    assert mask == [[1, 0, 0, 0],
                    [1, 1, 0, 0],
                    [1, 1, 1, 0],   # a padding row stays causal (its output is never used)
                    [1, 1, 0, 1]]   # the CLS sees the real tokens and itself


def test_cross_decoder_cached_equals_full_and_projects_context_once():
    decoder = CrossDecoder(32, 2, 4, context_dim=24).eval()
    x, context = torch.randn(2, 7, 32), torch.randn(2, 5, 24)
    full = decoder(x, context)
    prefix, caches = decoder.forward_cached(x[:, :3], None, context=context)
    steps = [prefix]
    for t in range(3, 7):
        out, caches = decoder.forward_cached(x[:, t : t + 1], caches)  # no context needed
        steps.append(out)
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)
    assert caches[0].self_kv.key.shape[2] == 7 and caches[0].cross_kv.key.shape[2] == 5


def test_cross_decoder_is_causal_and_initialised():
    decoder = CrossDecoder(32, 2, 4, context_dim=24).eval()
    x, context = torch.randn(1, 6, 32), torch.randn(1, 5, 24)
    changed = x.clone()
    changed[:, 4:] = torch.randn(1, 2, 32)
    torch.testing.assert_close(decoder(changed, context)[:, :4], decoder(x, context)[:, :4])
    fc2 = decoder.blocks[0].mlp.fc2.weight
    assert abs(fc2.std().item() - 32**-0.5 * 4**-0.5) < 0.02  # width^-0.5 (2 layers)^-0.5


def test_cls_text_tower_cached_tokens_equal_full_tokens():
    config = TextConfig(vocab_size=50, context_length=8, width=32, layers=2, heads=4,
                        pad_id=0, bos_id=1, eos_id=2)
    tower = ClsTextTransformer(config, output_dim=16).eval()
    ids = torch.tensor([[1, 7, 9, 2, 0, 0], [1, 5, 6, 8, 11, 2]])
    tokens, cls = tower.forward_features(ids)
    assert tokens.shape == (2, 6, 32) and cls.shape == (2, 32)
    head, caches = tower.forward_cached(ids[:, :2], None)
    rest, caches = tower.forward_cached(ids[:, 2:], caches)
    torch.testing.assert_close(torch.cat([head, rest], dim=1), tokens, atol=1e-5, rtol=1e-5)
    assert tower(ids).shape == (2, 16)
    assert tower.pos_embed.shape == (9, 32)  # context + CLS
