"""Greedy captioning speed of CoCa with and without the KV cache, on the same model and images.

    .venv/bin/python benchmarks/generation.py [--threads 1] [--device cpu] [--out PATH]

Both runs decode exactly ``--new-tokens`` tokens (``min_new_tokens`` = max) so they do the same
work, and must give the same tokens. Results (device named) go to
benchmarks/results/generation_<device>.json. open_clip's own CoCa ``generate`` is tried too and
its outcome recorded (it does not run with the installed transformers).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from workers import error_message  # noqa: E402

from vlp.config import get_preset
from vlp.models import build_model


def coca_tiny():
    return get_preset("coca-tiny")


def coca_small():
    # a ViT-B/32-shaped image tower at half depth and a 384-wide 4+4 layer text decoder over
    # the CLIP vocabulary: big enough that decoding cost is dominated by the text layers
    config = get_preset("coca-vit-b-32")
    config.vision.layers = 6
    config.embed_dim = 384
    config.caption_queries = 64
    config.pooler_heads = 6
    t = config.text
    t.width, t.layers, t.heads, t.context_length = 384, 4, 6, 40
    config.decoder_layers, config.decoder_heads = 4, 6
    return config


CONFIGS = {"coca-tiny": coca_tiny, "coca-small (vit-b-32 image, 384x4+4 text)": coca_small}


def time_generate(model, pixels, new_tokens: int, use_cache: bool, repeats: int):
    times, tokens = [], None
    for _ in range(repeats + 1):  # the first run warms up and is not counted
        start = time.perf_counter()
        tokens = model.generate(pixels, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                num_beams=1, use_cache=use_cache)
        if pixels.device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:]), tokens


def try_open_clip_generate() -> dict:
    """Run open_clip's CoCa.generate on a tiny random model; record how it ends."""
    try:
        import open_clip
        from open_clip.coca_model import CoCa
    except Exception as error:  # not installed, or it fails to import
        return {"ran": False, "error": error_message(error)}
    text = {"context_length": 12, "vocab_size": 64, "width": 32, "heads": 4, "layers": 1,
            "embed_cls": True, "output_tokens": True}
    vision = {"image_size": 32, "patch_size": 16, "width": 32, "layers": 1, "head_width": 16,
              "attentional_pool": True, "attn_pooler_queries": 5, "attn_pooler_heads": 4,
              "output_tokens": True}
    multimodal = {"context_length": 12, "vocab_size": 64, "width": 32, "heads": 4, "layers": 1}
    result = {"open_clip_version": open_clip.__version__}
    try:
        model = CoCa(32, multimodal, text, vision).eval()
        model.generate(torch.randn(1, 3, 32, 32), seq_len=8, generation_type="top_k", top_k=1,
                       sot_token_id=62, eos_token_id=63, pad_token_id=0)
        result.update(ran=True)
    except Exception as error:
        result.update(ran=False, error=error_message(error))
        try:  # open_clip gates generate() on this import; transformers 4.57 removed the class
            from transformers.generation import BeamSearchScorer  # noqa: F401
        except Exception as cause:
            import transformers

            result["cause"] = (f"transformers {transformers.__version__}: "
                               f"{error_message(cause)}")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (shared machines)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--new-tokens", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", help="default: benchmarks/results/generation_<device>.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    device_name = (torch.cuda.get_device_name(device) if device.type == "cuda"
                   else f"CPU ({platform.processor() or platform.machine()}, "
                        f"{args.threads} thread(s))")
    results = []
    for name, make_config in CONFIGS.items():
        torch.manual_seed(0)
        config = make_config()
        model = build_model(config).to(device).eval()
        size = config.vision.image_size
        pixels = torch.randn(args.batch_size, 3, size, size, device=device)
        cached, cached_tokens = time_generate(model, pixels, args.new_tokens, True,
                                              args.repeats)
        full, full_tokens = time_generate(model, pixels, args.new_tokens, False, args.repeats)
        row = {
            "model": name,
            "parameters_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 2),
            "batch_size": args.batch_size,
            "new_tokens": args.new_tokens,
            "seconds_with_cache": round(cached, 4),
            "seconds_without_cache": round(full, 4),
            "tokens_per_s_with_cache": round(args.batch_size * args.new_tokens / cached, 1),
            "tokens_per_s_without_cache": round(args.batch_size * args.new_tokens / full, 1),
            "speedup_from_cache": round(full / cached, 2),
            "same_tokens": bool(torch.equal(cached_tokens, full_tokens)),
        }
        print(json.dumps(row))
        results.append(row)
        del model
    report = {
        "benchmark": "greedy CoCa captioning, KV cache vs full re-run each step",
        "device": device_name,
        "torch": torch.__version__,
        "results": results,
        "open_clip_generate": try_open_clip_generate(),
    }
    print(json.dumps(report["open_clip_generate"]))
    out = Path(args.out or Path(__file__).parent / "results" / f"generation_{device.type}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
