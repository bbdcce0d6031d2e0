"""BLIP-2: the Q-Former's three stage-1 masks, frozen parts, stage 2 with decoder-only and
encoder-decoder LLMs, checkpoints that reference frozen parts, BERT init."""

import dataclasses

import pytest
import torch
from safetensors.torch import load_file

import vlp
from vlp.config import get_preset
from vlp.errors import ConfigError
from vlp.losses import IGNORE_INDEX
from vlp.models import build_model
from vlp.models.blip2_llm import prefix_lm_split
from vlp.nn.qformer import QFormer, qformer_mask
from vlp.train.optim import build_optimizer

transformers = pytest.importorskip("transformers")

LLM_VOCAB = 60
OPT = {"model_type": "opt", "vocab_size": LLM_VOCAB, "hidden_size": 16, "num_hidden_layers": 2,
       "num_attention_heads": 4, "ffn_dim": 24, "word_embed_proj_dim": 16,
       "max_position_embeddings": 64, "bos_token_id": 0, "pad_token_id": 1, "eos_token_id": 2}
T5 = {"model_type": "t5", "vocab_size": LLM_VOCAB, "d_model": 16, "d_kv": 4, "d_ff": 24,
      "num_layers": 2, "num_heads": 4, "pad_token_id": 1, "eos_token_id": 2,
      "decoder_start_token_id": 1}


def tiny(**changes):
    """blip2-tiny with a one-block image encoder (two built, the last one cut)."""
    config = get_preset("blip2-tiny")
    config.vision.layers = 2
    return dataclasses.replace(config, **changes)


def stage2(llm: str, llm_config: dict | None = None, **changes):
    return tiny(text_parts=False, retrieval_heads=False, lm_head=False, llm=llm,
                llm_config=llm_config, **changes)


def texts(batch: int = 3, length: int = 10, vocab: int = 1024, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (batch, length), generator=generator)
    ids[:, 0] = 2
    mask = torch.ones_like(ids)
    mask[1, length // 2:] = 0
    return ids.masked_fill(mask == 0, 0), mask


def pixels(batch: int = 3, seed: int = 1):
    return torch.randn(batch, 3, 64, 64, generator=torch.Generator().manual_seed(seed))


# -- the three masks of stage 1 (paper Fig. 2, right) -------------------------------------------

def test_stage1_masks_are_the_papers():
    Q, T = 2, 3
    text_mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    # rows: queries q0 q1, then text t0 t1 t2; columns the same keys; 1 = may attend
    itc = torch.tensor([[1, 1, 0, 0, 0],
                        [1, 1, 0, 0, 0],
                        [0, 0, 1, 1, 1],
                        [0, 0, 1, 1, 1],
                        [0, 0, 1, 1, 1]])
    itg = torch.tensor([[1, 1, 0, 0, 0],
                        [1, 1, 0, 0, 0],
                        [1, 1, 1, 0, 0],
                        [1, 1, 1, 1, 0],
                        [1, 1, 1, 1, 1]])
    itm = torch.ones(Q + T, Q + T, dtype=torch.long)
    for kind, expected in (("unimodal", itc), ("multimodal_causal", itg),
                           ("bidirectional", itm)):
        mask = qformer_mask(kind, Q, text_mask)
        assert mask.shape == (2, 1, Q + T, Q + T) and mask.dtype == torch.bool
        assert torch.equal(mask[0, 0].long(), expected), kind
        padded = expected.clone()
        padded[:, -1] = 0  # row 1's last text token is padding: no one attends to it
        assert torch.equal(mask[1, 0].long(), padded), kind
    with pytest.raises(ConfigError, match="expected one of"):
        qformer_mask("causal", Q, text_mask)


def test_masks_decide_who_sees_whom_in_the_qformer():
    torch.manual_seed(0)
    config = tiny().text
    qformer = QFormer(config, num_queries=4, image_dim=16, cross_attention_freq=2).eval()
    image = torch.randn(2, 5, 16)
    ids, mask = texts(batch=2, length=6, vocab=1000)
    mask = torch.ones_like(mask)
    changed = ids.clone()
    changed[:, 4] = (changed[:, 4] + 1) % 1000  # a later text token differs
    other_image = torch.randn(2, 5, 16)
    with torch.no_grad():
        def run(kind, token_ids=ids, img=image):
            return qformer(img, token_ids, mask, kind=kind)

        for kind in ("unimodal", "multimodal_causal"):  # queries never see text
            assert torch.equal(run(kind).query_states, run(kind, changed).query_states), kind
        assert not torch.allclose(run("bidirectional").query_states,
                                  run("bidirectional", changed).query_states)
        # ITG: text before the changed token is unchanged, the rest changes; ITM: all changes
        itg, itg_changed = run("multimodal_causal"), run("multimodal_causal", changed)
        assert torch.equal(itg.text_states[:, :4], itg_changed.text_states[:, :4])
        assert not torch.allclose(itg.text_states[:, 4:], itg_changed.text_states[:, 4:])
        itm, itm_changed = run("bidirectional"), run("bidirectional", changed)
        assert not torch.allclose(itm.text_states[:, :4], itm_changed.text_states[:, :4])
        # ITC: the text never sees the image, ITG's text does (through the queries)
        assert torch.allclose(run("unimodal").text_states,
                              run("unimodal", img=other_image).text_states)
        assert not torch.allclose(itg.text_states,
                                  run("multimodal_causal", img=other_image).text_states)
        # ITG through the queries' cached keys/values equals the masked joint pass
        _, caches = qformer.query_states(image)
        cached = qformer.text_after_queries(ids, mask, caches)
        torch.testing.assert_close(cached, itg.text_states, atol=1e-6, rtol=0)


# -- stage 1 ------------------------------------------------------------------------------------

def test_stage1_losses_are_logged_per_objective_and_frozen_parts_get_no_gradient():
    torch.manual_seed(0)
    model = build_model(tiny())
    model.train()
    assert model.qformer.training and not model.visual.training  # frozen: eval stays
    assert len(model.visual.tower.transformer.blocks) == 1  # second-to-last layer: one cut
    ids, mask = texts()
    out = model({"pixels": pixels(), "input_ids": ids, "attention_mask": mask})
    assert set(out["losses"]) == {"itc", "itm", "itg"}
    total = sum(out["losses"].values())
    assert torch.isclose(out["loss"].detach(), total)
    out["loss"].backward()
    for name, param in model.named_parameters():
        if name.startswith("visual."):
            assert not param.requires_grad and param.grad is None, name
        else:
            assert param.requires_grad and param.grad is not None, name


def _captions(csv):
    return [line.split(",", 1)[1] for line in csv.read_text().splitlines()[1:]]


def _save_stage1(directory, captions):
    """An untrained blip2-tiny saved to ``directory`` with a BPE trained on ``captions``."""
    from vlp.tokenizers import train_tokenizer

    tokenizer = train_tokenizer(captions, vocab_size=1024, context_length=32)
    torch.manual_seed(0)
    model = build_model(tiny())
    vlp.save(model, directory, tokenizer=tokenizer)
    return model, tokenizer


def test_stage1_through_the_real_trainer_leaves_the_frozen_encoder_unchanged(
        tmp_path, synthetic_train_csv, one_thread):
    from vlp.run import train
    from vlp.train import TrainConfig

    csv = synthetic_train_csv(16)
    initial, _ = _save_stage1(tmp_path / "init", _captions(csv))
    train(TrainConfig(model=str(tmp_path / "init"), train_data=str(csv),
                      output_dir=str(tmp_path / "run"), batch_size=4, max_steps=2, lr=1e-3,
                      num_workers=0, progress=False, seed=0))
    trained = load_file(tmp_path / "run" / "checkpoint-latest" / "model.safetensors")
    before = initial.state_dict()
    assert set(trained) == set(before)
    frozen = [name for name in before if name.startswith("visual.")]
    assert frozen and all(torch.equal(trained[n], before[n]) for n in frozen)
    assert not torch.equal(trained["qformer.query_tokens"], before["qformer.query_tokens"])
    assert not torch.equal(trained["ln_vision.weight"], before["ln_vision.weight"])


def test_retrieval_scores_and_itg_logits_have_the_papers_shapes():
    model = build_model(tiny()).eval()
    ids, mask = texts(batch=2)
    with torch.no_grad():
        assert model.encode_image(pixels(2)).shape == (2, 8, 128)  # one embedding per query
        assert model.itc_similarity(pixels(2), ids, mask).shape == (2, 2)
        assert model.itm_logits(pixels(2), ids, mask).shape == (2, 2)
        assert model.itg_logits(pixels(2), ids, mask).shape == (2, 10, 1025)


def test_frozen_encoder_can_be_stored_in_bf16():
    model = build_model(tiny(vision_dtype="bfloat16"))
    assert all(p.dtype == torch.bfloat16 for p in model.visual.parameters())
    assert model.qformer.query_tokens.dtype == torch.float32
    ids, mask = texts()
    out = model({"pixels": pixels(), "input_ids": ids, "attention_mask": mask})
    assert torch.isfinite(out["loss"])
    with pytest.raises(ConfigError, match="vision_dtype"):
        build_model(tiny(vision_dtype="fp8"))


# -- stage 2 ------------------------------------------------------------------------------------

def trainable_names(model) -> set[str]:
    return {name for name, param in model.named_parameters() if param.requires_grad}


@pytest.mark.parametrize("llm, llm_config", [("causal", OPT), ("seq2seq", T5)])
def test_stage2_trains_only_the_qformer_and_projection(llm, llm_config):
    torch.manual_seed(0)
    model = build_model(stage2(llm, llm_config))
    model.train()
    assert not model.llm.training and not model.visual.training
    names = trainable_names(model)
    assert names and all(n.split(".")[0] in {"qformer", "ln_vision", "llm_proj"} for n in names)
    expected = sum(p.numel() for part in (model.qformer, model.ln_vision, model.llm_proj)
                   for p in part.parameters())
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == expected
    assert model.qformer.token_embed is None and model.qformer.blocks[0].mlp is None

    ids, mask = texts(vocab=LLM_VOCAB)
    batch = {"pixels": pixels(), "input_ids": ids, "attention_mask": mask}
    if llm == "causal":
        batch["prompt_lengths"] = torch.tensor([2, 1, 3])
    frozen_before = {n: p.detach().clone() for n, p in model.named_parameters()
                     if not p.requires_grad}
    trained_before = {n: p.detach().clone() for n, p in model.named_parameters()
                      if p.requires_grad}
    optimizer = build_optimizer(model, lr=1e-2, weight_decay=0.05)
    out = model(batch)
    assert set(out["losses"]) == {"lm"} and torch.isfinite(out["loss"])
    out["loss"].backward()
    for name, param in model.named_parameters():
        assert (param.grad is not None) == param.requires_grad, name
    optimizer.step()
    for name, param in model.named_parameters():
        if name in frozen_before:
            assert torch.equal(param, frozen_before[name]), name
    assert not torch.equal(model.llm_proj.weight, trained_before["llm_proj.weight"])


def test_prefix_lm_split_keeps_every_token_once():
    ids = torch.tensor([[5, 6, 7, 8, 2], [9, 10, 2, 1, 1]])
    mask = (ids != 1).long()
    enc, enc_mask, labels = prefix_lm_split(ids, mask, eos_id=2, pad_id=1,
                                            generator=torch.Generator().manual_seed(0))
    for row in range(2):
        prefix = enc[row][enc_mask[row].bool()].tolist()
        target = labels[row][labels[row] != IGNORE_INDEX].tolist()
        assert prefix[-1] == 2 and target[-1] == 2 and len(target) >= 2
        assert prefix[:-1] + target == ids[row][mask[row].bool()].tolist()


def test_generation_through_the_llm(tmp_path):
    torch.manual_seed(0)
    model = build_model(stage2("causal", OPT)).eval()
    rows = model.generate(pixels(2), max_new_tokens=5, num_beams=3, length_penalty=-1.0)
    assert rows.shape[0] == 2 and rows.shape[1] <= 5
    prompt = torch.tensor([[0, 11, 12], [1, 0, 13]])  # left padding for batched VQA prompts
    answers = model.answer(pixels(2), prompt, (prompt != 1).long(), max_new_tokens=4)
    assert answers.shape[0] == 2 and answers.shape[1] <= 4
    t5 = build_model(stage2("seq2seq", T5)).eval()
    assert t5.generate(pixels(2), max_new_tokens=5).shape[0] == 2


# -- checkpoints: trained weights + references ---------------------------------------------------

def test_checkpoint_stores_trained_weights_and_references_to_frozen_parts(tmp_path):
    clip = vlp.create_model("clip-tiny")
    vlp.save(clip, tmp_path / "clip")
    opt = transformers.AutoModelForCausalLM.from_config(
        transformers.AutoConfig.for_model(**OPT))
    opt.save_pretrained(tmp_path / "opt")
    config = stage2("causal", vision_path=str(tmp_path / "clip"), llm_path=str(tmp_path / "opt"))
    torch.manual_seed(0)
    model = build_model(config).eval()
    torch.testing.assert_close(model.visual.tower.patch_embed.weight,
                               clip.visual.patch_embed.weight)
    vlp.save(model, tmp_path / "blip2")
    stored = load_file(tmp_path / "blip2" / "model.safetensors")
    assert stored and all(name.split(".")[0] in {"qformer", "ln_vision", "llm_proj"}
                          for name in stored)
    loaded = vlp.load(tmp_path / "blip2").eval()
    ids, mask = texts(vocab=LLM_VOCAB)
    with torch.no_grad():
        torch.testing.assert_close(loaded.llm_logits(pixels(), ids, mask),
                                   model.llm_logits(pixels(), ids, mask), atol=0, rtol=0)


def test_frozen_parts_from_directories_are_plain_modules_on_any_kernels_setting(tmp_path,
                                                                              monkeypatch):
    """transformers 5's from_pretrained swaps layers for Hub kernels unless told not to (and
    without the `kernels` package refuses to load); vlp's frozen LLM and HF image encoder are
    always loaded as their plain modules, as on transformers 4.57."""
    monkeypatch.setenv("USE_HUB_KERNELS", "YES")  # transformers' own default
    transformers.AutoModelForCausalLM.from_config(
        transformers.AutoConfig.for_model(**OPT)).save_pretrained(tmp_path / "opt")
    transformers.CLIPVisionModel(transformers.CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
        image_size=64, patch_size=16)).save_pretrained(tmp_path / "hf_vision")
    model = build_model(stage2("causal", llm_path=str(tmp_path / "opt"), vision_format="hf",
                               vision_path=str(tmp_path / "hf_vision"))).eval()
    assert not getattr(model.llm, "use_kernels", False)
    ids, mask = texts(vocab=LLM_VOCAB)
    with torch.no_grad():
        assert torch.isfinite(model.llm_logits(pixels(), ids, mask)).all()


def test_qformer_initialises_from_bert(tmp_path):
    bert = transformers.BertForMaskedLM(transformers.BertConfig(
        vocab_size=1000, hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=512, max_position_embeddings=40))
    bert.save_pretrained(tmp_path / "bert")
    from vlp.interop.hf_blip2 import init_qformer_from_bert_

    model = build_model(tiny())
    cross_before = model.qformer.blocks[0].cross_attn.q.weight.clone()
    names = init_qformer_from_bert_(model, tmp_path / "bert")
    assert "blocks.1.mlp_query.fc1.weight" in names
    layer = bert.bert.encoder.layer[1]
    block = model.qformer.blocks[1]
    torch.testing.assert_close(block.mlp_query.fc1.weight, layer.intermediate.dense.weight)
    torch.testing.assert_close(block.mlp.fc1.weight, layer.intermediate.dense.weight)
    torch.testing.assert_close(block.attn.qkv.weight[128:256],
                               layer.attention.self.key.weight)
    torch.testing.assert_close(model.qformer.token_embed.weight[:1000],
                               bert.bert.embeddings.word_embeddings.weight)
    assert torch.equal(model.qformer.blocks[0].cross_attn.q.weight, cross_before)  # random


def test_bad_configs_are_named():
    with pytest.raises(ConfigError, match="exactly one of llm_path"):
        build_model(stage2("causal"))
    with pytest.raises(ConfigError, match="llm 'decoder'"):
        build_model(stage2("decoder", OPT))
    with pytest.raises(ConfigError, match="does not fit"):
        build_model(stage2("seq2seq", OPT))
    with pytest.raises(ConfigError, match="need text_parts"):
        build_model(tiny(text_parts=False))
    with pytest.raises(ConfigError, match="vision_layer 5"):
        build_model(tiny(vision_layer=5))


# -- other frozen image encoders ------------------------------------------------------------------

def test_hf_and_open_clip_vision_towers_give_their_second_to_last_layer(tmp_path):
    import json

    import open_clip

    clip = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
        image_size=64, patch_size=16)).eval()
    clip.save_pretrained(tmp_path / "hf_vision")
    tiny_open_clip = {"embed_dim": 16, "vision_cfg": {"image_size": 64, "layers": 3,
                                                      "width": 32, "patch_size": 16,
                                                      "head_width": 16},
                      "text_cfg": {"context_length": 8, "vocab_size": 100, "width": 32,
                                   "heads": 2, "layers": 1}}
    (tmp_path / "oc").mkdir()
    (tmp_path / "oc" / "vlp-blip2-test.json").write_text(json.dumps(tiny_open_clip))
    open_clip.add_model_config(tmp_path / "oc")
    pix, (ids, mask) = pixels(2), texts(batch=2)
    for fmt, path in (("hf", str(tmp_path / "hf_vision")), ("open_clip", "vlp-blip2-test")):
        torch.manual_seed(0)
        model = build_model(tiny(vision_format=fmt, vision_path=path))
        with torch.no_grad():
            features = model.visual(pix)
            if fmt == "hf":
                expected = clip(pixel_values=pix, output_hidden_states=True).hidden_states[-2]
            else:
                out = model.visual.tower.forward_intermediates(
                    pix, indices=[1], intermediates_only=True, output_fmt="NLC",
                    output_extra_tokens=True)
                expected = torch.cat([out["image_intermediates_prefix"][0],
                                      out["image_intermediates"][0]], dim=1)
        assert features.shape == (2, 17, 32)
        torch.testing.assert_close(features, expected, atol=0, rtol=0)
        out = model({"pixels": pix, "input_ids": ids, "attention_mask": mask})
        assert torch.isfinite(out["loss"]) and not model.visual.training
        assert not any(name.startswith("visual.") for name in model.state_dict())


# -- stage 2 through the trainer: the LLM's tokenizer, starting from stage 1 ----------------------

def test_stage2_text_mask_ends_at_the_first_eos_after_bos():
    from vlp.models.blip2_llm import mask_through_eos

    ids = torch.tensor([[7, 5, 6, 7, 7, 7],   # GPT-2 style: bos = eos = pad = 7
                        [2, 5, 1, 0, 0, 0],   # vlp BPE: bos 2, eos 1, pad 0
                        [2, 5, 6, 8, 9, 4]])  # cut without eos: all of it
    assert mask_through_eos(ids[:1], 7).tolist() == [[1, 1, 1, 1, 0, 0]]
    assert mask_through_eos(ids[1:], 1).tolist() == [[1, 1, 1, 0, 0, 0], [1] * 6]


def _llm_dir(tmp_path, captions, name="lm", vocab_size=300):
    """A tiny OPT saved with a BPE tokenizer of its own (other ids than the Q-Former's)."""
    from vlp.tokenizers import train_tokenizer

    tokenizer = train_tokenizer(captions, vocab_size=vocab_size, context_length=16)
    config = dict(OPT, vocab_size=tokenizer.vocab_size, bos_token_id=tokenizer.bos_id,
                  pad_token_id=tokenizer.pad_id, eos_token_id=tokenizer.eos_id)
    torch.manual_seed(0)
    llm = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model(**config))
    llm.save_pretrained(tmp_path / name)
    tokenizer.save(tmp_path / name)
    return tmp_path / name, tokenizer


STAGE2_OVERRIDES = {"llm": "causal", "text_parts": False, "retrieval_heads": False,
                    "lm_head": False, "llm_context_length": 20}


def test_stage2_through_the_trainer_reads_the_llm_tokenizer_and_starts_from_stage1(
        tmp_path, synthetic_train_csv, one_thread):
    from vlp.run import model_and_tokenizer, train
    from vlp.train import TrainConfig
    from vlp.train.distributed import DistEnv

    csv = synthetic_train_csv(16)
    captions = _captions(csv)
    stage1, qformer_tokenizer = _save_stage1(tmp_path / "stage1", captions)
    lm_dir, llm_tokenizer = _llm_dir(tmp_path, captions)
    assert llm_tokenizer.vocab_size < qformer_tokenizer.vocab_size
    cfg = TrainConfig(model=str(tmp_path / "stage1"),
                      model_overrides=dict(STAGE2_OVERRIDES, llm_path=str(lm_dir)),
                      train_data=str(csv), output_dir=str(tmp_path / "run"), batch_size=4,
                      max_steps=2, lr=1e-3, num_workers=0, progress=False, seed=0)

    start, tokenizer = model_and_tokenizer(cfg, tmp_path, DistEnv())
    assert tokenizer.vocab_size == llm_tokenizer.vocab_size and tokenizer.context_length == 20
    assert start.config.text.bos_id == stage1.config.text.bos_id  # the Q-Former's ids kept
    before = stage1.state_dict()
    shared = [k for k in start.state_dict() if k.startswith(("qformer.", "ln_vision."))]
    assert "qformer.query_tokens" in shared and len(shared) < len(before)
    assert all(torch.equal(start.state_dict()[k], before[k]) for k in shared)

    result = train(cfg)
    saved = tmp_path / "run" / "checkpoint-latest"
    assert result["step"] == 2 and torch.isfinite(torch.tensor(result["loss"]))
    assert vlp.load_tokenizer(saved).vocab_size == llm_tokenizer.vocab_size
    stored = load_file(saved / "model.safetensors")
    # the LLM is saved by reference; the ViT built from the config is saved as weights
    assert {name.split(".")[0] for name in stored} == {"qformer", "ln_vision", "llm_proj",
                                                       "visual"}
    # stage 2 from a stage-2 checkpoint is strict, and a resumed run reads the LLM's tokenizer
    again = model_and_tokenizer(dataclasses.replace(cfg, model=str(saved), model_overrides={}),
                                tmp_path, DistEnv())[0]
    torch.testing.assert_close(again.llm_proj.weight, vlp.load(saved).llm_proj.weight)
    resumed = train(dataclasses.replace(cfg, max_steps=3, resume="latest"))
    assert resumed["step"] == 3


def test_stage2_refuses_a_tokenizer_that_does_not_fit_the_llm(
        tmp_path, synthetic_train_csv, one_thread):
    from vlp.run import train
    from vlp.tokenizers import train_tokenizer
    from vlp.train import TrainConfig

    csv = synthetic_train_csv(16)
    captions = _captions(csv)
    lm_dir, _ = _llm_dir(tmp_path, captions)
    train_tokenizer(captions, vocab_size=1024, context_length=32).save(tmp_path / "qformer_tok")
    base = TrainConfig(model="blip2-tiny", train_data=str(csv), output_dir=str(tmp_path / "run"),
                       batch_size=4, max_steps=1, num_workers=0, progress=False)
    with pytest.raises(ConfigError, match="embedding has"):  # the Q-Former's tokenizer
        train(dataclasses.replace(base, tokenizer=str(tmp_path / "qformer_tok"),
                                  model_overrides=dict(STAGE2_OVERRIDES, llm_path=str(lm_dir))))
    with pytest.raises(ConfigError, match="the LLM's tokenizer directory"):
        train(dataclasses.replace(base, model_overrides=dict(
            STAGE2_OVERRIDES, llm_config=dict(OPT, vocab_size=400))))


def test_vlp_eval_retrieval_on_a_stage1_checkpoint_ranks_by_the_best_query(
        tmp_path, synthetic_train_csv, one_thread, capsys):
    """Generic retrieval asks the family how it scores: BLIP-2 takes each pair's best query
    (the paper's ITC); the CLI's numbers equal recalls computed by hand from the embeddings."""
    import json

    from vlp.cli import main
    from vlp.data import build_source
    from vlp.eval.embed import embed_images, embed_texts

    csv = synthetic_train_csv(16)
    model, tokenizer = _save_stage1(tmp_path / "stage1", _captions(csv))
    assert main(["eval", str(tmp_path / "stage1"), "--retrieval-data", str(csv),
                 "--itm-k", "4"]) == 0
    metrics = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    groups = build_source("csv", str(csv)).groups()
    images = embed_images(model.eval(), groups.images, progress=False).embeddings
    assert images.ndim == 3  # one embedding per query
    texts = embed_texts(model, tokenizer, groups.texts, progress=False)
    scores = torch.einsum("iqd,td->itq", images, texts).amax(dim=-1)  # (N, M)
    own = torch.tensor(groups.text_to_image)
    i2t_top = scores.argmax(dim=1)
    t2i_top = scores.argmax(dim=0)
    assert metrics["i2t_r1"] == pytest.approx(
        (own[i2t_top] == torch.arange(len(groups.images))).float().mean().item())
    assert metrics["t2i_r1"] == pytest.approx((t2i_top == own).float().mean().item())
    assert metrics["num_images"] == len(groups.images)
    # ITM re-ranks each query's top 4 by the match logit plus the ITC score: a hit at 1 after
    # re-ranking is a hit within the ITC top 4
    assert metrics["k_test"] == 4
    assert 0 <= metrics["itm_i2t_r1"] <= metrics["i2t_r5"] and "itm_t2i_r1" in metrics


def test_vqa_batches_give_stage2_its_prompt_left_padded_and_stage1_its_question():
    """The library's VQA path feeds BLIP-2 on a decoder-only LLM "Question: {} Short answer:"
    as a generation prompt (bos, no eos, left-padded, masked), as the paper and LAVIS do."""
    from vlp.config import VQA_PROMPT
    from vlp.data.qa import QACollate
    from vlp.tokenizers import train_tokenizer

    tokenizer = train_tokenizer(["what colour is the circle", "red", "question short answer"],
                                vocab_size=300, context_length=32)
    questions = ["what colour", "what colour is the circle"]
    batch = QACollate(tokenizer, stage2("causal", OPT)).texts(questions, ["red", "red"])
    ids, mask = batch["question_ids"], batch["question_mask"]
    for row, question in enumerate(questions):
        expected = [tokenizer.bos_id, *tokenizer.encode_batch([VQA_PROMPT.format(question)])[0]]
        assert ids[row, mask[row]].tolist() == expected
        assert mask[row, -1] and (not mask[row].all()) == (len(expected) < ids.shape[1])
    assert not mask[0, 0]  # the shorter prompt is padded on the left
    plain = QACollate(tokenizer, tiny()).texts(questions, ["red", "red"])["question_ids"]
    # stage 1: the question itself, as the tokenizer's own rows (bos ... eos, right-padded)
    assert plain[0].tolist()[:3] == [tokenizer.bos_id,
                                     *tokenizer.encode_batch(["what colour"])[0]][:3]
    assert tokenizer.eos_id in plain[0].tolist()
