import math

import torch
import torch.nn.functional as F

from vlp.losses import clip_loss, siglip_loss


def test_clip_loss_perfect_and_uniform():
    eye = torch.eye(4)
    perfect = clip_loss(eye, eye, torch.tensor(100.0)).loss
    assert perfect.item() < 1e-6
    same = F.normalize(torch.ones(4, 4), dim=-1)
    assert math.isclose(clip_loss(same, same, torch.tensor(10.0)).loss.item(), math.log(4),
                        rel_tol=1e-6)


def test_clip_loss_local_global_equals_full_batch():
    torch.manual_seed(0)
    img = F.normalize(torch.randn(8, 16), dim=-1)
    txt = F.normalize(torch.randn(8, 16), dim=-1)
    scale = torch.tensor(20.0)
    full = clip_loss(img, txt, scale).loss
    # two "ranks" of 4: each scores its rows against the gathered batch
    parts = [clip_loss(img[r * 4:(r + 1) * 4], txt[r * 4:(r + 1) * 4], scale,
                       all_image_features=img, all_text_features=txt, rank=r).loss
             for r in range(2)]
    torch.testing.assert_close(sum(parts) / 2, full)


def test_siglip_loss_hand_computed():
    img = torch.eye(2)
    txt = torch.eye(2)
    out = siglip_loss(img, txt, torch.tensor(1.0), torch.tensor(0.0))
    # positives logit 1, negatives logit 0: per image -logsig(1) - logsig(-0)
    expected = -(F.logsigmoid(torch.tensor(1.0)) + F.logsigmoid(torch.tensor(0.0)))
    torch.testing.assert_close(out.loss, expected)
