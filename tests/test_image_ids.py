"""Captions of one image are never each other's negatives: training batches carry ``image_id``
(rows of the same image share it), and BLIP's and BLIP-2's ITC targets and ITM negative draws
follow it, across ranks and through BLIP's feature queue; batches where every row is its own
image train exactly as without ids."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from vlp.config import get_preset
from vlp.data import build_source, image_transform, make_loader
from vlp.data.images import image_group_id
from vlp.losses import (
    clip_loss,
    distilled_contrastive_loss,
    query_contrastive_loss,
    same_image_targets,
    sample_hard_negatives,
)
from vlp.models import build_model
from vlp.tokenizers import train_tokenizer
from vlp.train.distributed import GatherExchange

pytestmark = pytest.mark.usefixtures("one_thread")


def _unit(rows: int, dim: int = 8, seed: int = 0) -> torch.Tensor:
    return F.normalize(torch.randn(rows, dim, generator=torch.Generator().manual_seed(seed)),
                       dim=-1)


def test_targets_spread_over_every_column_of_the_rows_image():
    targets = same_image_targets(torch.tensor([5, 7, 5]), torch.tensor([5, 7, 5, 9, 7, -1]))
    expected = torch.tensor([[0.5, 0, 0.5, 0, 0, 0], [0, 0.5, 0, 0, 0.5, 0],
                             [0.5, 0, 0.5, 0, 0, 0]])
    torch.testing.assert_close(targets, expected)
    # one caption per image: no soft targets, the callers keep their one-hot ones
    assert same_image_targets(torch.tensor([1, 2]), torch.tensor([1, 2, 3])) is None
    assert same_image_targets(torch.tensor([-1, -1]), torch.tensor([-1, -1])) is None
    assert same_image_targets(None, torch.tensor([1])) is None


def test_itc_losses_treat_other_captions_of_the_image_as_positives():
    image, text, scale = _unit(4, seed=1), _unit(4, seed=2), torch.tensor(10.0)
    ids = torch.tensor([3, 8, 3, 4])
    logits_i, logits_t = scale * image @ text.T, scale * text @ image.T
    soft = torch.tensor([[0.5, 0, 0.5, 0], [0, 1, 0, 0], [0.5, 0, 0.5, 0], [0, 0, 0, 1.0]])
    hand = 0.5 * (-(logits_i.log_softmax(1) * soft).sum(1).mean()
                  - (logits_t.log_softmax(1) * soft).sum(1).mean())
    torch.testing.assert_close(clip_loss(image, text, scale, image_ids=ids).loss, hand)
    # BLIP-2: the same targets, label-smoothed as LAVIS does (0.9 * targets + 0.1 / N)
    queries = torch.stack([image, _unit(4, seed=3)], dim=1)  # (B, Q=2, D)
    sim_i = scale * torch.einsum("iqd,td->itq", queries, text).amax(-1)
    sim_t = scale * torch.einsum("td,iqd->tiq", text, queries).amax(-1)
    smooth = 0.9 * soft + 0.1 / 4
    hand = 0.5 * (-(sim_i.log_softmax(1) * smooth).sum(1).mean()
                  - (sim_t.log_softmax(1) * smooth).sum(1).mean())
    got = query_contrastive_loss(queries, text, scale, label_smoothing=0.1, image_ids=ids).loss
    torch.testing.assert_close(got, hand)
    # distillation: queued rows of a batch's image are positives too (BLIP retrieval)
    queue_i, queue_t = _unit(3, seed=4), _unit(3, seed=5)
    bank_i, bank_t = torch.cat([image, queue_i]), torch.cat([text, queue_t])
    bank_ids = torch.cat([ids, torch.tensor([8, -1, 11])])
    alpha = 0.4
    one_hot = same_image_targets(ids, bank_ids)
    assert one_hot[1].tolist() == [0, 0.5, 0, 0, 0.5, 0, 0]
    targets_i = alpha * (scale * image @ bank_t.T).softmax(1) + (1 - alpha) * one_hot
    targets_t = alpha * (scale * text @ bank_i.T).softmax(1) + (1 - alpha) * one_hot
    hand = 0.5 * (-((scale * image @ bank_t.T).log_softmax(1) * targets_i).sum(1).mean()
                  - ((scale * text @ bank_i.T).log_softmax(1) * targets_t).sum(1).mean())
    got = distilled_contrastive_loss(image, text, bank_i, bank_t, scale, alpha,
                                     image_ids=ids, bank_ids=bank_ids).loss
    torch.testing.assert_close(got, hand)


def test_unique_ids_compute_exactly_what_no_ids_do():
    image, text, scale = _unit(5, seed=1), _unit(5, seed=2), torch.tensor(14.0)
    ids = torch.arange(5) * 7
    assert torch.equal(clip_loss(image, text, scale, image_ids=ids).loss,
                       clip_loss(image, text, scale).loss)
    queries = torch.stack([image, _unit(5, seed=3)], dim=1)
    assert torch.equal(query_contrastive_loss(queries, text, scale, label_smoothing=0.1,
                                              image_ids=ids).loss,
                       query_contrastive_loss(queries, text, scale, label_smoothing=0.1).loss)
    bank_i, bank_t = torch.cat([image, _unit(3, seed=4)]), torch.cat([text, _unit(3, seed=5)])
    bank_ids = torch.cat([ids, torch.tensor([-1, 100, 101])])
    assert torch.equal(
        distilled_contrastive_loss(image, text, bank_i, bank_t, scale, 0.4, image_ids=ids,
                                   bank_ids=bank_ids).loss,
        distilled_contrastive_loss(image, text, bank_i, bank_t, scale, 0.4).loss)


def test_itm_never_draws_another_caption_of_the_rows_image():
    ids = torch.tensor([1, 1, 2, 2, 3, 1])
    similarity = torch.zeros(6, 6)
    similarity[:, [0, 1, 5]] = 30.0  # the same-image columns would win every draw
    generator = torch.Generator().manual_seed(0)
    for _ in range(200):
        image_per_text, text_per_image = sample_hard_negatives(
            similarity, similarity.clone(), generator=generator, image_ids=ids,
            candidate_ids=ids)
        assert (ids[image_per_text] != ids).all() and (ids[text_per_image] != ids).all()


@pytest.mark.parametrize("family", ["blip", "blip-noqueue", "blip2"])
def test_models_train_exactly_as_before_when_every_row_is_its_own_image(family):
    """The demos' losses (BLIP with its queue, without, BLIP-2 stage 1) are bitwise those
    of batches without ids while no two rows, queued ones included, share an image."""
    name = "blip2-tiny" if family == "blip2" else "blip-tiny"
    config = get_preset(name)
    if family == "blip-noqueue":
        config.queue_size = 0
    losses = {}
    for with_ids in (False, True):
        torch.manual_seed(0)
        model = build_model(config).train()
        for step in range(3):
            generator = torch.Generator().manual_seed(step)
            ids = torch.randint(3, 1000, (4, 8), generator=generator)
            ids[:, 0], ids[:, -1] = config.text.bos_id, config.text.eos_id
            size = config.vision.image_size
            batch = {"pixels": torch.randn(4, 3, size, size, generator=generator),
                     "input_ids": ids}
            if with_ids:
                batch["image_id"] = torch.arange(4) + 10 * step
            torch.manual_seed(100 + step)
            out = model.loss(model.features(batch))
            out["loss"].backward()
            losses.setdefault(with_ids, []).append(out["loss"].detach())
    assert all(torch.equal(a, b) for a, b in zip(losses[False], losses[True])), losses


def test_loader_batches_name_each_rows_image(tmp_path):
    from PIL import Image

    rows = ["filepath,caption"]
    for index in range(3):
        Image.new("RGB", (32, 32), (index * 80, 0, 0)).save(tmp_path / f"{index}.png")
        rows += [f"{index}.png,caption {index} a", f"{index}.png,caption {index} b"]
    (tmp_path / "pairs.csv").write_text("\n".join(rows) + "\n")
    source = build_source("csv", tmp_path / "pairs.csv")
    config = get_preset("blip-tiny")
    tokenizer = train_tokenizer([f"caption {i} a b" for i in range(3)], vocab_size=300,
                                context_length=16)
    batch = next(iter(make_loader(source, transform=image_transform(config, False),
                                  tokenizer=tokenizer, batch_size=6, train=False)))
    expected = [image_group_id(str(tmp_path / f"{i // 2}.png")) for i in range(6)]
    assert batch["image_id"].tolist() == expected
    assert len(set(expected)) == 3 and min(expected) >= 0
    # encoded bytes are one image by content, whatever record brought them
    data = (tmp_path / "0.png").read_bytes()
    assert image_group_id(data) == image_group_id(bytes(data)) != image_group_id(b"other")


# -- two processes ---------------------------------------------------------------------------------

RANK_IDS = ([10, 11, 12], [12, 13, 10])  # image 10 and 12 have a caption on each rank


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    from vlp.models import blip

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        ids = torch.tensor(RANK_IDS[rank])
        image, text = _unit(6, seed=1)[3 * rank:3 * rank + 3], _unit(6, seed=2)[3 * rank:][:3]
        itc = clip_loss(image, text, torch.tensor(10.0), exchange=GatherExchange(),
                        image_ids=ids).loss
        torch.manual_seed(0)  # same weights on both ranks
        model = build_model(get_preset("blip-tiny")).train()
        model.exchange = GatherExchange()
        draws, sample = [], blip.sample_hard_negatives

        def recording(*args, **kwargs):
            drawn = sample(*args, **kwargs)
            draws.append((torch.stack(drawn), kwargs["candidate_ids"]))
            return drawn

        blip.sample_hard_negatives = recording
        torch.manual_seed(1 + rank)
        config = model.config.text
        input_ids = torch.randint(3, 1000, (3, 8))
        input_ids[:, 0], input_ids[:, -1] = config.bos_id, config.eos_id
        batch = {"pixels": torch.randn(3, 3, 64, 64), "input_ids": input_ids, "image_id": ids}
        for _ in range(6):
            model.loss(model.features(batch))["loss"].backward()
        torch.save({"itc": itc, "draws": draws, "queue_ids": model.queue.get_ids()},
                   os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_two_ranks_never_make_other_captions_of_an_image_negatives(tmp_path: Path) -> None:
    mp.spawn(_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2)
    ids = torch.tensor(RANK_IDS[0] + RANK_IDS[1])
    image, text, scale = _unit(6, seed=1), _unit(6, seed=2), torch.tensor(10.0)
    whole = clip_loss(image, text, scale, image_ids=ids).loss  # one process, whole batch
    results = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(2)]
    # each rank scores its rows against the gathered batch with the gathered ids' targets
    torch.testing.assert_close((results[0]["itc"] + results[1]["itc"]) / 2, whole)
    for rank, result in enumerate(results):
        mine = torch.tensor(RANK_IDS[rank])
        drawn_other_rank = False
        for indices, candidate_ids in result["draws"]:
            assert torch.equal(candidate_ids, ids)  # every rank's ids, gathered
            assert (candidate_ids[indices] != mine).all()  # never a caption of the same image
            drawn_other_rank |= bool(((indices // 3) != rank).any())
        assert drawn_other_rank
        # the queue holds every rank's momentum features with their ids
        assert set(result["queue_ids"].tolist()) == {-1, *ids.tolist()}
