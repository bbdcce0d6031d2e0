"""Where the time of each inference pair goes, on both sides: the limit on vlp's speed-up.

    .venv/bin/python benchmarks/profile_inference.py [--out benchmarks/results/inference_profile_cpu.json]
        [--only NAME ...] [--repeats 2] [--threads N] [--toy]

For each case of benchmarks/inference_cases.py that names a part (BLIP captioning and VQA,
BLIP-2, the image path) and the CLIP image embeddings, each side (vlp and its reference library,
same weights and inputs as benchmarks/inference.py) is timed whole and, where the case has one,
for its part alone: the image tower on the same pixels (generation) or the JPEG decoding (the
image path). The part is work both libraries do through the same kernels (PyTorch's matrix
products; Pillow's libjpeg-turbo), so the reference's time over vlp's time for that part alone
is the ceiling of the ratio a faster rest could reach (``ceiling_if_rest_free``). One more run
of each side goes under ``torch.profiler`` and its self CPU time is summed by operator kind
(matrix products, attention, normalisation, activations, copies, element-wise, other).

Each side runs in its own process (``spawn``), one after the other; nothing runs in parallel.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import inference_cases  # noqa: E402
from inference import _versions  # noqa: E402
from train_throughput import _load_average, device_name  # noqa: E402

KINDS = (  # (kind, substrings of aten operator names), first match wins
    ("matrix products", ("addmm", "aten::mm", "bmm", "matmul", "linear", "mkldnn", "mkl_",
                         "quantized", "fbgemm", "conv")),
    ("attention", ("scaled_dot_product", "flash_attention", "softmax")),
    ("normalisation", ("layer_norm", "native_layer_norm")),
    ("activations", ("gelu", "tanh", "sigmoid", "relu", "silu")),
    ("copies and layout", ("copy", "clone", "contiguous", "cat", "stack", "index", "gather",
                           "scatter", "empty", "fill", "_to_", "aten::to", "zeros", "ones",
                           "repeat", "expand", "narrow", "select", "slice", "view", "reshape",
                           "permute", "transpose", "unsqueeze", "split", "chunk", "flip")),
    ("element-wise", ("add", "mul", "div", "sub", "where", "masked", "pow", "rsqrt", "sqrt",
                      "exp", "log", "neg", "clamp", "eq", "ne", "lt", "gt", "le", "ge", "max",
                      "min", "sum", "mean", "topk", "sort", "argmax", "cumsum", "any", "all")),
)
PROFILED = ("blip_caption_greedy", "blip_vqa_beam3", "blip2_opt_greedy",
            "clip-vit-b-32_image_embedding", "clip-vit-b-16_image_embedding", "image_path_224")
PART_NAMES = {"image_path_224": "JPEG decode (Pillow, both sides)",
              None: "image tower (the side's own encoder on the same pixels)"}


def _kind(name: str) -> str:
    for kind, keys in KINDS:
        if any(key in name for key in keys):
            return kind
    return "other"


def _median_seconds(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        with torch.no_grad():
            fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _profile(fn) -> dict:
    from torch.profiler import ProfilerActivity, profile

    with torch.no_grad(), profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    by_kind: dict[str, float] = {}
    top = []
    for event in prof.key_averages():
        if event.self_cpu_time_total <= 0:
            continue
        kind = _kind(event.key)
        by_kind[kind] = by_kind.get(kind, 0.0) + event.self_cpu_time_total
        top.append((event.self_cpu_time_total, event.key))
    total = sum(by_kind.values()) or 1.0
    top.sort(reverse=True)
    return {"self_cpu_share_by_kind": {k: round(v / total, 3) for k, v in
                                       sorted(by_kind.items(), key=lambda kv: -kv[1])},
            "top_operators": [{"operator": key, "self_cpu_share": round(t / total, 3)}
                              for t, key in top[:8]]}


def _side(conn, case_name: str, side: str, toy: bool, threads: int, directory: str,
          repeats: int) -> None:
    try:
        case = next(c for c in inference_cases.cases(toy) if c.name == case_name)
        torch.set_num_threads(case.settings.get("threads", threads))
        run = case.build(side, case.settings, Path(directory))
        with torch.no_grad():
            run.run()  # warmup
            if run.part:
                run.part()
        out = {"samples": run.samples, "run_s": _median_seconds(run.run, repeats)}
        if run.part:
            out["part_s"] = _median_seconds(run.part, repeats)
        out.update(_profile(run.run))
        conn.send(out)
    except BaseException as error:
        conn.send({"error": f"{type(error).__name__}: {error}",
                   "traceback_tail": "".join(traceback.format_exception(error))[-2000:]})
    finally:
        conn.close()


def profile_case(context, case, args) -> dict:
    sides = [s for s in case.sides if s == "vlp" or not s.startswith("vlp")]
    row: dict = {"case": case.name, "sides": sides,
                 "settings": {k: v for k, v in case.settings.items() if k != "toy"}}
    with tempfile.TemporaryDirectory(prefix="vlp-profile-") as directory:
        case.prepare(case.settings, Path(directory))
        for side in sides:
            parent, child = context.Pipe()
            process = context.Process(target=_side, args=(child, case.name, side, args.toy,
                                                          args.threads, directory, args.repeats))
            process.start()
            child.close()
            answer = parent.recv() if parent.poll(args.timeout) else {"error": "timeout"}
            process.join(timeout=30)
            if process.is_alive():
                process.kill()
            if "error" in answer:
                row["error"] = f"{side}: {answer['error']}"
                return row
            entry = {"run_s": round(answer["run_s"], 3),
                     **{k: answer[k] for k in ("self_cpu_share_by_kind", "top_operators")}}
            if "part_s" in answer:
                entry["part_s"] = round(answer["part_s"], 3)
                entry["part_share_of_run"] = round(answer["part_s"] / answer["run_s"], 3)
            row[side] = entry
    ours = row["vlp"]
    for reference in sides[1:]:
        theirs = row[reference]
        ratios = {"run": round(theirs["run_s"] / ours["run_s"], 3)}
        if "part_s" in ours:
            ratios["part"] = round(theirs["part_s"] / ours["part_s"], 3)
            # vlp's rest (run minus part) taking no time at all: the reference's run over
            # vlp's part alone
            ratios["ceiling_if_rest_free"] = round(theirs["run_s"] / ours["part_s"], 3)
        row[f"vlp/{reference}"] = ratios
    if "part_s" in ours:
        row["part"] = PART_NAMES.get(case.name, PART_NAMES[None])
    return row


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="default: benchmarks/results/inference_profile_cpu.json")
    parser.add_argument("--only", nargs="+", choices=PROFILED, help="case names (default: all)")
    parser.add_argument("--repeats", type=int, default=2, help="timed runs per side and part")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per side")
    parser.add_argument("--toy", action="store_true", help="tiny shapes: checks the script runs")
    args = parser.parse_args(argv)
    chosen = [c for c in inference_cases.cases(args.toy)
              if c.name in (args.only or PROFILED)]
    context = mp.get_context("spawn")
    load_before, start, results = _load_average(), time.perf_counter(), []
    for case in chosen:
        row = profile_case(context, case, args)
        print(json.dumps({k: v for k, v in row.items() if k.startswith("vlp/") or k in
                          ("case", "error")}), flush=True)
        results.append(row)
    report = {
        "benchmark": "where inference time goes, vlp and its reference library, same weights "
                     "and inputs as benchmarks/inference.py",
        "device": device_name(torch.device("cpu"), args.threads),
        "threads": args.threads,
        "precision": "fp32",
        "versions": _versions(),
        "load_average_1_5_15min": {"before": load_before, "after": _load_average()},
        "protocol": {"repeats": args.repeats, "statistic": "median seconds per run and per "
                     "part; operator shares from one profiled run (torch.profiler self CPU "
                     "time, which adds its own overhead per operator)"},
        "toy": args.toy,
        "wall_s": round(time.perf_counter() - start, 1),
        "results": results,
    }
    out = Path(args.out or Path(__file__).parent / "results" / "inference_profile_cpu.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out} in {report['wall_s']} s")


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
