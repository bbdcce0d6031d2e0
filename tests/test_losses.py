import math

import torch
import torch.nn.functional as F

from vlp.losses import caption_nll, clip_loss, siglip_loss


def test_clip_loss_perfect_and_uniform():
    eye = torch.eye(4)
    perfect = clip_loss(eye, eye, torch.tensor(100.0)).loss
    assert perfect.item() < 1e-6
    same = F.normalize(torch.ones(4, 4), dim=-1)
    assert math.isclose(clip_loss(same, same, torch.tensor(10.0)).loss.item(), math.log(4),
                        rel_tol=1e-6)


class _Gathered:
    """A FeatureExchange over tensors already gathered: ``{offset: (all_image, all_text)}``."""

    def __init__(self, gathered, local_loss):
        (self.offset, self.tensors), = gathered.items()
        self.local_loss = local_loss

    def gather(self, *features):
        assert len(features) == len(self.tensors)  # texts alone (SigLIP) or images and texts
        return list(self.tensors), self.offset


def test_clip_loss_local_global_equals_full_batch():
    torch.manual_seed(0)
    img = F.normalize(torch.randn(8, 16), dim=-1)
    txt = F.normalize(torch.randn(8, 16), dim=-1)
    scale = torch.tensor(20.0)
    full = clip_loss(img, txt, scale).loss
    # two "ranks" of 4: each scores its rows against the gathered batch
    parts = [clip_loss(img[r * 4:(r + 1) * 4], txt[r * 4:(r + 1) * 4], scale,
                       exchange=_Gathered({4 * r: (img, txt)}, local_loss=True)).loss
             for r in range(2)]
    torch.testing.assert_close(sum(parts) / 2, full)
    # global variant: each rank computes the whole-batch loss
    whole = clip_loss(img[:4], txt[:4], scale, exchange=_Gathered({0: (img, txt)}, False)).loss
    torch.testing.assert_close(whole, full)


def test_siglip_loss_hand_computed():
    img = torch.eye(2)
    txt = torch.eye(2)
    out = siglip_loss(img, txt, torch.tensor(1.0), torch.tensor(0.0))
    # positives logit 1, negatives logit 0: per image -logsig(1) - logsig(-0)
    expected = -(F.logsigmoid(torch.tensor(1.0)) + F.logsigmoid(torch.tensor(0.0)))
    torch.testing.assert_close(out.loss, expected)


def test_siglip_loss_blocks_over_gathered_texts_equal_full_batch():
    torch.manual_seed(0)
    img = F.normalize(torch.randn(6, 8), dim=-1)
    txt = F.normalize(torch.randn(6, 8), dim=-1)
    scale, bias = torch.tensor(10.0, requires_grad=True), torch.tensor(-3.0)
    full = siglip_loss(img, txt, scale, bias).loss
    parts = [siglip_loss(img[r * 3:(r + 1) * 3], txt[r * 3:(r + 1) * 3], scale, bias,
                         exchange=_Gathered({3 * r: (txt,)}, local_loss=True)).loss
             for r in range(2)]
    torch.testing.assert_close(sum(parts) / 2, full)
    grad_full, = torch.autograd.grad(full, scale)
    grad_parts, = torch.autograd.grad(sum(parts) / 2, scale)
    torch.testing.assert_close(grad_parts, grad_full)


def test_caption_nll_ignores_padding_and_merges_rows():
    torch.manual_seed(0)
    logits = torch.randn(3, 5, 11)
    labels = torch.randint(0, 11, (3, 5))
    labels[0, 3:] = -100
    nll, tokens = caption_nll(logits, labels)
    assert tokens.tolist() == [3, 5, 5]
    mean = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)
    torch.testing.assert_close(nll.sum() / tokens.sum(), mean)
