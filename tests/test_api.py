"""The public Python API of DESIGN.md, as a user writes it, for CLIP."""

import torch
from PIL import Image

import vlp
from vlp.tokenizers import train_tokenizer


def test_public_api_round_trip(tmp_path):
    assert {"clip-tiny", "clip-vit-b-32", "clip-vit-b-16", "clip-vit-l-14"} <= set(
        vlp.list_models())
    model = vlp.create_model("clip-tiny").eval()
    tok = train_tokenizer(["a red circle", "a blue square left of a green star"] * 20,
                          vocab_size=300, context_length=32)
    path = vlp.save(model, tmp_path / "out", tokenizer=tok)
    assert {p.name for p in path.iterdir()} >= {"config.json", "model.safetensors",
                                                 "tokenizer.json"}
    loaded = vlp.load(tmp_path / "out").eval()
    tok2 = vlp.load_tokenizer(tmp_path / "out")
    preprocess = vlp.image_transform(loaded, train=False)
    pixels = preprocess(Image.new("RGB", (90, 70), (200, 30, 30))).unsqueeze(0)
    assert pixels.shape == (1, 3, 64, 64)
    img = loaded.encode_image(pixels)
    txt = loaded.encode_text(tok2(["a red circle", "a blue square"]))
    assert img.shape == (1, 128) and txt.shape == (2, 128)
    torch.testing.assert_close(img.norm(dim=-1), torch.ones(1))
    with torch.no_grad():
        torch.testing.assert_close(model.encode_image(pixels), img)
        torch.testing.assert_close(model.encode_text(tok(["a red circle", "a blue square"])), txt)

