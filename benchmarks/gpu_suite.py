"""The GPU suite: vlp against open_clip and transformers on one GPU, in under 8 minutes.

    .venv/bin/python benchmarks/gpu_suite.py [--out benchmarks/results/gpu_suite_cuda.json]
        [--budget-s 450] [--repeats 5]

Parts, in this order (the compiled training runs last, each only while the time budget lasts;
one skipped for time is recorded as such):
  1. training samples/s, bf16 autocast, eager: CLIP ViT-B/32 and ViT-B/16 vs open_clip's
     ``ViT-B-32`` / ``ViT-B-16``, CoCa ViT-B/32 vs open_clip's ``coca_ViT-B-32`` (random init,
     equal parameter counts asserted; same batch, seeded inputs; forward + loss + backward +
     AdamW step);
  2. BLIP captions/s at the ViT-B/16 shape (384 px, 20 tokens, greedy and beam 3) vs
     ``BlipForConditionalGeneration.generate`` on the same random weights (bf16 weights both);
  3. image embedding images/s (CLIP ViT-B/16, bf16 autocast) vs open_clip and ``CLIPModel``;
  4. the training runs of part 1 with ``torch.compile`` on forward + loss.
Each pair alternates run by run (ABAB, reversed every other repeat); medians; peak GPU memory
is ``torch.cuda.max_memory_allocated`` of each side's timed runs (reset before them). Without a
GPU it prints one line saying so and exits with status 2 (``--allow-cpu --toy`` runs the same
code on tiny shapes on the CPU, which is how its tests check it).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import inference_cases  # noqa: E402
from workers import error_message, versions  # noqa: E402

TRAIN_MODELS = {  # name: (vlp preset, open_clip model name)
    "clip-vit-b-32": ("clip-vit-b-32", "ViT-B-32"),
    "clip-vit-b-16": ("clip-vit-b-16", "ViT-B-16"),
    "coca-vit-b-32": ("coca-vit-b-32", "coca_ViT-B-32"),
}
TOY_MODELS = {"clip-tiny": ("clip-tiny", None)}


class Budget:
    def __init__(self, seconds: float) -> None:
        self.start, self.seconds = time.perf_counter(), seconds

    def left(self) -> float:
        return self.seconds - (time.perf_counter() - self.start)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _peak_mb(device: torch.device) -> float | None:
    if device.type == "cuda":
        return round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    return None


def alternate(fns: dict, repeats: int, device: torch.device, samples: int) -> dict:
    """One warmup call each, then ``repeats`` timed calls each, sides taking turns."""
    names = list(fns)
    out = {name: {"times": []} for name in names}
    for name in names:
        start = time.perf_counter()
        fns[name]()
        _sync(device)
        out[name]["first_call_s"] = round(time.perf_counter() - start, 2)
    for rep in range(repeats):
        for name in names if rep % 2 == 0 else names[::-1]:
            _reset_peak(device)
            start = time.perf_counter()
            fns[name]()
            _sync(device)
            out[name]["times"].append(time.perf_counter() - start)
            peak = _peak_mb(device)
            out[name]["peak_memory_mb"] = max(out[name].get("peak_memory_mb") or 0, peak or 0)
    result = {}
    for name in names:
        rates = [samples / t for t in out[name]["times"]]
        result[name] = {"samples_per_s": round(statistics.median(rates), 2),
                        "samples_per_s_reps": [round(r, 2) for r in rates],
                        "first_call_s": out[name]["first_call_s"],
                        "peak_memory_mb": out[name]["peak_memory_mb"] or None}
    first = names[0]
    result["ratio"] = {name: round(result[first]["samples_per_s"]
                                   / result[name]["samples_per_s"], 3) for name in names[1:]}
    return result


# -- training -------------------------------------------------------------------------------------

def _train_step_fns(name: str, models: dict, batch: int, device: torch.device, compiled: bool):
    import open_clip

    from vlp.config import get_preset
    from vlp.models import build_model

    preset, reference = models[name]
    config = get_preset(preset)
    generator = torch.Generator().manual_seed(0)
    size, text = config.vision.image_size, config.text
    pixels = torch.randn(batch, 3, size, size, generator=generator).to(device)
    ids = torch.randint(3, text.vocab_size - 2, (batch, text.context_length),
                        generator=generator)
    ids[:, -1] = text.eos_id
    ids = ids.to(device)
    torch.manual_seed(0)
    ours = build_model(config).to(device).train()
    if reference is None:  # toy: open_clip built from vlp's exported config of the same shape
        from vlp.interop.open_clip import open_clip_config_from_clip
        from vlp.interop.open_clip_coca import open_clip_config_from_coca

        is_coca = preset.startswith("coca")
        cfg = (open_clip_config_from_coca if is_coca else open_clip_config_from_clip)(config)
        cfg = cfg["model_cfg"]
        theirs = (open_clip.CoCa if is_coca else open_clip.CLIP)(**cfg)
    else:
        theirs = open_clip.create_model(reference)
    theirs = theirs.to(device).train()
    counts = [sum(p.numel() for p in m.parameters()) for m in (ours, theirs)]
    if counts[0] != counts[1]:
        raise AssertionError(f"{name}: parameter counts differ {counts}")
    if preset.startswith("coca"):
        criterion = open_clip.CoCaLoss(caption_loss_weight=2.0, clip_loss_weight=1.0,
                                       pad_id=text.pad_id)

        def their_loss(p, i):
            out = theirs(p, i)
            return sum(criterion(out["image_features"], out["text_features"], out["logits"],
                                 out["labels"], out["logit_scale"]))
    else:
        criterion = open_clip.ClipLoss()

        def their_loss(p, i):
            return criterion(*theirs(p, i))

    def our_loss(p, i):
        return ours({"pixels": p, "input_ids": i})["loss"]

    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    fns = {}
    for label, module, loss_fn in (("vlp", ours, our_loss), ("open_clip", theirs, their_loss)):
        optimizer = torch.optim.AdamW(module.parameters(), lr=1e-5)
        step_loss = torch.compile(loss_fn) if compiled else loss_fn

        def step(step_loss=step_loss, optimizer=optimizer):
            with autocast:
                loss = step_loss(pixels, ids)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        fns[label] = step
    return fns, counts[0]


def part_training(args, device, budget, compiled: bool) -> list[dict]:
    rows = []
    models = TOY_MODELS if args.toy else TRAIN_MODELS
    for name in models:
        row = {"part": "training", "model": name, "mode": "compiled" if compiled else "eager",
               "batch_size": args.train_batch, "precision": "bf16 autocast"
               if device.type == "cuda" else "fp32"}
        if budget.left() < (120 if compiled else 30):
            row["skipped"] = f"time budget: {budget.left():.0f} s left"
            rows.append(row)
            continue
        try:
            fns, params = _train_step_fns(name, models, args.train_batch, device, compiled)
            row["parameters_m"] = round(params / 1e6, 2)
            row.update(alternate(fns, args.repeats, device, args.train_batch))
        except Exception as error:  # recorded; the suite goes on
            row["error"] = error_message(error)
        rows.append(row)
        print(json.dumps(row), flush=True)
        fns = None
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


# -- BLIP captions, image embedding ----------------------------------------------------------------

def part_blip(args, device, budget, directory: Path) -> list[dict]:
    from transformers import BlipForConditionalGeneration

    from vlp.interop.hf_blip import load_hf_blip

    settings = {"toy": args.toy, "batch": args.blip_batch}
    inference_cases.prepare_blip("caption")(settings, directory)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    ours = load_hf_blip(directory / "hf")[0].eval().to(device, dtype)
    theirs = BlipForConditionalGeneration.from_pretrained(directory / "hf").eval().to(device,
                                                                                      dtype)
    size = theirs.config.vision_config.image_size
    sep = theirs.config.text_config.sep_token_id
    pixels = inference_cases._pixels(settings, size).to(device, dtype)
    new = 5 if args.toy else 20
    rows = []
    for beams in (1, 3):
        gen = dict(max_new_tokens=new, min_new_tokens=new, num_beams=beams)
        outputs = {}

        def vlp_run(gen=gen, outputs=outputs):
            outputs["vlp"] = inference_cases._rows(
                ours.generate(pixels, early_stopping=False, **gen), 0, sep)

        def hf_run(gen=gen, outputs=outputs):
            outputs["transformers"] = inference_cases._rows(
                theirs.generate(pixel_values=pixels, **gen), 1, sep)

        row = {"part": "blip_captioning", "beams": beams, "batch_size": args.blip_batch,
               "new_tokens": new, "precision": str(dtype).replace("torch.", "")}
        if budget.left() < 30:
            row["skipped"] = f"time budget: {budget.left():.0f} s left"
        else:
            with torch.no_grad():
                row.update(alternate({"vlp": vlp_run, "transformers": hf_run}, args.repeats,
                                     device, args.blip_batch))
            row["rows_equal"] = sum(a == b for a, b in zip(outputs["vlp"],
                                                            outputs["transformers"]))
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def part_embedding(args, device, budget, directory: Path) -> list[dict]:
    import open_clip
    from transformers import CLIPModel

    from vlp.interop.hf import save_hf
    from vlp.interop.open_clip import save_open_clip
    from vlp.models import build_model

    settings = {"toy": args.toy, "preset": "clip-vit-b-16", "batch": args.embed_batch}
    config = inference_cases.clip_vlp_config(settings)
    torch.manual_seed(0)
    ours = build_model(config).eval()
    save_open_clip(ours, directory / "open_clip")
    save_hf(ours, directory / "hf")
    ours = ours.to(device)
    theirs_oc = open_clip.create_model(f"local-dir:{directory / 'open_clip'}").eval().to(device)
    theirs_hf = CLIPModel.from_pretrained(directory / "hf").eval().to(device)
    pixels = inference_cases._pixels(settings, config.vision.image_size).to(device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    def run(fn):
        def call():
            with torch.inference_mode(), autocast:
                return fn()
        return call

    row = {"part": "image_embedding", "model": settings["preset"],
           "batch_size": args.embed_batch, "precision": "bf16 autocast"
           if device.type == "cuda" else "fp32"}
    if budget.left() < 30:
        row["skipped"] = f"time budget: {budget.left():.0f} s left"
    else:
        row.update(alternate({
            "vlp": run(lambda: ours.encode_image(pixels, normalize=False)),
            "open_clip": run(lambda: theirs_oc.encode_image(pixels)),
            "transformers": run(lambda: theirs_hf.get_image_features(pixel_values=pixels))},
            args.repeats, device, args.embed_batch))
    print(json.dumps(row), flush=True)
    return [row]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="default: benchmarks/results/gpu_suite_cuda.json")
    parser.add_argument("--budget-s", type=float, default=450.0,
                        help="seconds after which remaining parts are skipped (recorded)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--train-batch", type=int, default=128)
    parser.add_argument("--blip-batch", type=int, default=32)
    parser.add_argument("--embed-batch", type=int, default=256)
    parser.add_argument("--allow-cpu", action="store_true", help="run on the CPU (tests)")
    parser.add_argument("--toy", action="store_true", help="tiny shapes (tests)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available() and not args.allow_cpu:
        print("gpu_suite: no CUDA GPU visible (torch.cuda.is_available() is False); this suite "
              "measures GPU throughput, run it on a machine with an NVIDIA GPU", file=sys.stderr)
        return 2
    import tempfile

    device = torch.device("cuda" if torch.cuda.is_available() and not args.allow_cpu else "cpu")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    budget = Budget(args.budget_s)
    results: list[dict] = []
    results += part_training(args, device, budget, compiled=False)
    with tempfile.TemporaryDirectory(prefix="vlp-gpu-suite-") as directory:
        for part in (part_blip, part_embedding):
            sub = Path(directory) / part.__name__
            sub.mkdir()
            try:
                results += part(args, device, budget, sub)
            except Exception as error:  # recorded; the suite goes on
                results.append({"part": part.__name__.removeprefix("part_"),
                                "error": error_message(error)})
    results += part_training(args, device, budget, compiled=True)
    report = {
        "benchmark": "GPU suite: training (eager, compiled), BLIP captioning, image embedding; "
                     "vlp vs open_clip / transformers",
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "versions": versions(),
        "protocol": {"repeats": args.repeats, "order": "sides alternate, reversed every other "
                     "repeat", "statistic": "median samples/s; ratio vlp / reference",
                     "memory": "torch.cuda.max_memory_allocated over each side's timed runs"},
        "budget_s": args.budget_s,
        "wall_s": round(time.perf_counter() - budget.start, 1),
        "toy": args.toy,
        "results": results,
    }
    out = Path(args.out or Path(__file__).parent / "results" / f"gpu_suite_{device.type}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out} in {report['wall_s']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
