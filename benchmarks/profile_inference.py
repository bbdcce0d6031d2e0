"""Where the time of each inference pair goes, on both sides: the limit on vlp's speed-up.

    .venv/bin/python benchmarks/profile_inference.py [--only NAME ...] [--repeats 3]
        [--threads N] [--toy] [--skip-sides transformers ...]
        [--out benchmarks/results/inference_profile_cpu.json]

For each case of benchmarks/inference_cases.py that names a part (BLIP captioning and VQA,
BLIP-2, the image path) and the CLIP image embeddings, each side (vlp and its reference library,
same weights and inputs as benchmarks/inference.py) is timed whole and, where the case has one,
for its part alone: the image tower on the same pixels (generation), or what Pillow does (the
image path: JPEG decode, resize, centre crop). The part is work both libraries hand to the same
code (PyTorch's matrix products; Pillow's C), so were the rest of vlp's run free, vlp /
reference could reach at most the reference's whole run over vlp's part alone
(``ceiling_if_rest_free``). One more run of each side goes under ``torch.profiler`` and its
self CPU time is summed by operator kind (matrix products, attention, normalisation,
activations, copies, element-wise, other); only PyTorch operators count there (Pillow's work
does not appear).

Each side runs in its own process (``spawn``); a case's sides are alive at once and take turns
(reversed every other repeat), so no two timed runs overlap and other load hits each alike.
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
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import inference_cases  # noqa: E402
from workers import (  # noqa: E402
    WorkerError,
    WorkerProcess,
    device_name,
    load_average,
    serve,
    versions,
    write_result,
)

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
def _kind(name: str) -> str:
    for kind, keys in KINDS:
        if any(key in name for key in keys):
            return kind
    return "other"


def _seconds(fn) -> float:
    start = time.perf_counter()
    with torch.no_grad():
        fn()
    return time.perf_counter() - start


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


def _side(conn, case_name: str, side: str, toy: bool, threads: int, directory: str) -> None:
    """Serve ("run",), ("part",) (seconds of one), ("profile",), ("quit",) for one side."""
    def start():
        case = next(c for c in inference_cases.cases(toy) if c.name == case_name)
        torch.set_num_threads(case.settings.get("threads", threads))
        run = case.build(side, case.settings, Path(directory))
        with torch.no_grad():
            run.run()  # warmup
            if run.part:
                run.part()

        def handle(request: tuple) -> dict | None:
            if request[0] in ("run", "part"):
                return {"seconds": _seconds(getattr(run, request[0]))}
            return _profile(run.run) if request[0] == "profile" else None
        return {"samples": run.samples, "part": run.part and run.part_name}, handle
    serve(conn, start)


def profile_case(context, case, args) -> dict:
    """All sides alive at once, taking turns (reversed every other repeat) for the whole run
    and for its part, so other load on the machine hits every side alike."""
    sides = [s for s in case.sides if (s == "vlp" or not s.startswith("vlp"))
             and s not in args.skip_sides]
    row: dict = {"case": case.name, "sides": sides,
                 "settings": {k: v for k, v in case.settings.items() if k != "toy"}}
    with tempfile.TemporaryDirectory(prefix="vlp-profile-") as directory:
        case.prepare(case.settings, Path(directory))
        workers = {side: WorkerProcess(context, side, _side, case_name=case.name, side=side,
                                       toy=args.toy, threads=args.threads,
                                       directory=directory) for side in sides}
        try:
            # the sides build and warm up at once; nothing is timed until all have answered
            parts = {w.answer(None, args.timeout)["part"] for w in workers.values()}
            part = None if None in parts else parts.pop()
            times: dict[str, dict[str, list[float]]] = {s: {"run": [], "part": []}
                                                        for s in sides}
            for rep in range(args.repeats):
                for side in sides if rep % 2 == 0 else sides[::-1]:
                    for what in ("run", "part") if part else ("run",):
                        seconds = workers[side].ask((what,), args.timeout)["seconds"]
                        times[side][what].append(seconds)
            for side in sides:
                run_s = statistics.median(times[side]["run"])
                entry = {"run_s": round(run_s, 3),
                         "run_s_reps": [round(t, 3) for t in times[side]["run"]]}
                if part:
                    part_s = statistics.median(times[side]["part"])
                    entry.update(part_s=round(part_s, 3),
                                 part_s_reps=[round(t, 3) for t in times[side]["part"]],
                                 part_share_of_run=round(part_s / run_s, 3))
                entry.update(workers[side].ask(("profile",), args.timeout))
                row[side] = entry
        except (WorkerError, TimeoutError) as error:
            row["error"] = str(error)
            return row
        finally:
            for worker in workers.values():
                worker.stop()
    ours = row["vlp"]
    for reference in sides[1:]:
        theirs = row[reference]
        ratios = {"run": round(theirs["run_s"] / ours["run_s"], 3)}
        if part:
            ratios["part"] = round(theirs["part_s"] / ours["part_s"], 3)
            # vlp's rest (run minus part) taking no time at all: the reference's run over
            # vlp's part alone
            ratios["ceiling_if_rest_free"] = round(theirs["run_s"] / ours["part_s"], 3)
        row[f"vlp/{reference}"] = ratios
    if part:
        row["part"] = part
    return row


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="default: benchmarks/results/inference_profile_cpu.json")
    parser.add_argument("--only", nargs="+", choices=PROFILED, help="case names (default: all)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per side and part")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per side")
    parser.add_argument("--toy", action="store_true", help="tiny shapes: checks the script runs")
    parser.add_argument("--skip-sides", nargs="+", default=[],
                        choices=("open_clip", "transformers"), help="reference sides left out")
    args = parser.parse_args(argv)
    chosen = [c for c in inference_cases.cases(args.toy)
              if c.name in (args.only or PROFILED)]
    context = mp.get_context("spawn")
    load_before, start, results = load_average(), time.perf_counter(), []
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
        "versions": versions(),
        "load_average_1_5_15min": {"before": load_before, "after": load_average()},
        "protocol": {"repeats": args.repeats, "order": "sides alive at once, taking turns "
                     "(reversed every other repeat); each turn times a whole run, then its part",
                     "statistic": "median seconds per run and per part; operator shares from "
                     "one profiled run (torch.profiler self CPU time, which adds its own "
                     "overhead per operator)"},
        "toy": args.toy,
        "wall_s": round(time.perf_counter() - start, 1),
        "results": results,
    }
    out = write_result(report, args.out, "inference_profile_cpu.json")
    print(f"wrote {out} in {report['wall_s']} s")


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
