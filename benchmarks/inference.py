"""Inference speed and memory of vlp against transformers and open_clip, pair by pair.

    .venv/bin/python benchmarks/inference.py [--out benchmarks/results/inference_cpu.json]
        [--only NAME ...] [--repeats 5] [--threads N] [--toy]

Pairs (benchmarks/inference_cases.py): BLIP captioning at the ViT-B/16 shape (384 px, batch 8,
20 new tokens) greedy and beam 3 vs ``BlipForConditionalGeneration.generate``; BLIP VQA answers
(beam 3) vs ``BlipForQuestionAnswering.generate``; BLIP-2 (real Q-Former shape, ViT-B/16 image
tower, OPT-125m-shaped LLM) vs ``Blip2ForConditionalGeneration.generate``; CLIP image and text
embedding at ViT-B/32 and ViT-B/16 vs open_clip and ``CLIPModel``; the image path (decode +
resize + crop + normalise of web-sized JPEGs, one thread) vs open_clip's eval transform and
``CLIPImageProcessor``. CoCa captioning vs open_clip is recorded when open_clip's ``generate``
runs at all.

Every pair uses the same random weights (drawn once, converted with vlp.interop), inputs and
thread count. Each side runs in its own fresh worker process (so its resident-memory
high-water mark is its own); the workers take turns (ABAB..., reversed every other repeat) and
the JSON holds the median samples/s of each side, the ratio vlp / reference (also the median of
per-repeat ratios), whether the outputs are identical (token rows) or their largest difference
and lowest cosine (embeddings, pixels), and the peak resident memory over the timed runs.
``vlp_bf16`` and ``vlp_int8`` (BLIP greedy captions, ViT-B/16 image embedding) are the same vlp
model in bfloat16 weights and with dynamic int8 ``nn.Linear`` layers (CPU serving options):
their speed and how far their outputs move from the fp32 reference. Generation runs
exactly ``new_tokens`` tokens on both sides (``min_new_tokens`` = max) so they do equal work.
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
from generation import try_open_clip_generate  # noqa: E402
from workers import (  # noqa: E402
    WorkerError,
    WorkerProcess,
    device_name,
    load_average,
    reset_peak_rss,
    rss_kb,
    serve,
    versions,
    write_result,
)


def _worker(conn, case_name: str, side: str, toy: bool, threads: int, directory: str) -> None:
    """Serve ("warmup",), ("time",), ("output",), ("quit",) for one side of one case."""
    def start():
        case = next(c for c in inference_cases.cases(toy) if c.name == case_name)
        torch.set_num_threads(case.settings.get("threads", threads))
        rss_before_kb = rss_kb("VmRSS")
        run = case.build(side, case.settings, Path(directory))
        state = {"output": None}

        def handle(request: tuple) -> dict | None:
            if request[0] == "warmup":
                with torch.no_grad():
                    state["output"] = run.run()
                state["resident_kb"] = rss_kb("VmRSS")
                state["reset"] = reset_peak_rss()
                return {"reset": state["reset"]}
            if request[0] == "time":
                start, cpu = time.perf_counter(), time.process_time()
                with torch.no_grad():
                    state["output"] = run.run()
                return {"seconds": time.perf_counter() - start,
                        "cpu_s": time.process_time() - cpu}
            if request[0] == "output":
                peak_kb, output = rss_kb("VmHWM"), state["output"]
                if isinstance(output, torch.Tensor):
                    output = output.detach().float()
                return {"output": output,
                        "peak_rss_mb": round(peak_kb / 1024, 1),
                        "peak_over_start_mb": round((peak_kb - rss_before_kb) / 1024, 1),
                        "resident_after_warmup_mb": round(state["resident_kb"] / 1024, 1),
                        "peak_method": "VmHWM over the timed runs (reset after warmup)"
                        if state["reset"] else "VmHWM of the whole worker"}
            return None
        return {"parameters": run.parameters, "samples": run.samples}, handle
    serve(conn, start)


def _ours(name: str) -> bool:
    return name.startswith("vlp")


def _compare(case, outputs: dict) -> dict:
    """Each vlp side's output against each reference library's: equal token rows, or the
    largest difference (within ``tolerance``: "identical") and the lowest row cosine."""
    result = {}
    references = [s for s in case.sides if not _ours(s)]
    for ours in (s for s in case.sides if _ours(s)):
        for reference in references:
            a, b = outputs[ours], outputs[reference]
            if case.compare == "tokens":
                entry = {"identical": a == b, "rows_equal": sum(x == y for x, y in zip(a, b)),
                         "rows": len(a)}
            else:
                a, b = a.flatten(1).double(), b.flatten(1).double()
                diff = (a - b).abs()
                entry = {"identical": bool(diff.max() <= case.tolerance),
                         "max_abs_diff": float(f"{diff.max().item():.3g}"),
                         "mean_abs_diff": float(f"{diff.mean().item():.3g}"),
                         "min_cosine": round(torch.nn.functional.cosine_similarity(
                             a, b).min().item(), 5),
                         "tolerance": case.tolerance}
            result[f"{ours}/{reference}"] = entry
    return result


def measure(context, case, args) -> dict:
    row: dict = {"case": case.name, "sides": list(case.sides),
                 "settings": {k: v for k, v in case.settings.items() if k != "toy"}}
    with tempfile.TemporaryDirectory(prefix="vlp-inference-") as directory:
        start = time.perf_counter()
        case.prepare(case.settings, Path(directory))
        row["prepare_s"] = round(time.perf_counter() - start, 1)
        sides = {name: WorkerProcess(context, name, _worker, side=name, case_name=case.name,
                                     toy=args.toy, threads=args.threads, directory=directory)
                 for name in case.sides}
        try:
            info = {name: s.ask(None, args.timeout) for name, s in sides.items()}
            for name in case.sides:  # one at a time: warmups must not overlap either
                sides[name].ask(("warmup",), args.timeout)
            per_rep: dict[str, list[float]] = {name: [] for name in case.sides}
            cpu: dict[str, list[float]] = {name: [] for name in case.sides}
            for rep in range(args.repeats):
                order = case.sides if rep % 2 == 0 else case.sides[::-1]
                for name in order:
                    answer = sides[name].ask(("time",), args.timeout)
                    per_rep[name].append(info[name]["samples"] / answer["seconds"])
                    cpu[name].append(answer["cpu_s"] / info[name]["samples"])
            final = {name: s.ask(("output",), args.timeout) for name, s in sides.items()}
            for name in case.sides:
                row[name] = {
                    "samples_per_s": round(statistics.median(per_rep[name]), 3),
                    "samples_per_s_reps": [round(v, 3) for v in per_rep[name]],
                    "cpu_ms_per_sample": round(1e3 * statistics.median(cpu[name]), 2),
                    "parameters_m": round(info[name]["parameters"] / 1e6, 2),
                    **{k: v for k, v in final[name].items() if k != "output"},
                }
            row["outputs"] = _compare(case, {n: f["output"] for n, f in final.items()})
            row["ratio"], row["ratio_paired"], row["ratio_peak_rss"] = {}, {}, {}
            for ours in (s for s in case.sides if _ours(s)):
                for name in (s for s in case.sides if not _ours(s)):
                    key = f"{ours}/{name}"
                    row["ratio"][key] = round(row[ours]["samples_per_s"]
                                              / row[name]["samples_per_s"], 3)
                    row["ratio_paired"][key] = round(statistics.median(
                        a / b for a, b in zip(per_rep[ours], per_rep[name])), 3)
                    row["ratio_peak_rss"][key] = round(row[ours]["peak_rss_mb"]
                                                       / row[name]["peak_rss_mb"], 3)
        except (WorkerError, TimeoutError) as error:
            row["error"] = str(error)[-3000:]
            if isinstance(error, WorkerError):
                row["traceback_tail"] = error.answer.get("traceback_tail")
        finally:
            for s in sides.values():
                s.stop()
    return row


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="default: benchmarks/results/inference_cpu.json")
    parser.add_argument("--only", nargs="+", help="case names (default: all)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per side")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per request")
    parser.add_argument("--toy", action="store_true", help="tiny shapes: checks the script runs")
    parser.add_argument("--skip-sides", nargs="+", default=[],
                        help="sides left out of every case (e.g. transformers vlp_int8)")
    args = parser.parse_args(argv)
    chosen = inference_cases.cases(args.toy)
    if args.only:
        unknown = set(args.only) - {c.name for c in chosen}
        if unknown:
            parser.error(f"--only: unknown case(s) {sorted(unknown)}; expected names from "
                         f"{[c.name for c in chosen]}")
        chosen = [c for c in chosen if c.name in args.only]
    for case in chosen:
        case.sides = tuple(s for s in case.sides if s not in args.skip_sides)
    context = mp.get_context("spawn")
    load_before, start, results = load_average(), time.perf_counter(), []
    for case in chosen:
        row = measure(context, case, args)
        print(json.dumps({k: row[k] for k in ("case", "ratio", "ratio_paired", "outputs", "error")
                          if k in row}), flush=True)
        results.append(row)
    report = {
        "benchmark": "inference: vlp vs transformers / open_clip, same random weights, inputs "
                     "and threads, each side in its own process",
        "device": device_name(torch.device("cpu"), args.threads),
        "threads": args.threads,
        "threads_note": "torch.get_num_threads() of the run unless --threads; the image path "
                        "runs one thread (images/s per core)",
        "precision": "fp32",
        "versions": versions(),
        "load_average_1_5_15min": {"before": load_before, "after": load_average()},
        "protocol": {"repeats": args.repeats, "order": "sides alternate, reversed every other "
                     "repeat", "warmup": "one untimed run per side",
                     "statistic": "median samples/s; ratio_paired: median of per-repeat "
                                  "vlp/reference ratios"},
        "toy": args.toy,
        "wall_s": None,
        "results": results,
        "coca_open_clip_generate": try_open_clip_generate(),
    }
    report["wall_s"] = round(time.perf_counter() - start, 1)
    out = write_result(report, args.out, "inference_cpu.json")
    print(f"wrote {out} in {report['wall_s']} s")


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
