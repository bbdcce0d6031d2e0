"""Training throughput and peak memory of vlp's CLIP against open_clip's on the same shape.

    .venv/bin/python benchmarks/train_throughput.py [--models clip-tiny vit-b-32] [--batch N]
        [--steps N] [--repeats 6] [--compile | --no-compile] [--device cpu|cuda]
        [--optimizer own|same] [--out PATH]

One training step = forward of both towers + contrastive loss + backward + AdamW step, on the
same seeded random images and full-length token ids (no padding, so vlp's trimming of
all-padding columns does no work and both libraries run the same FLOPs). open_clip's model is
built from a config dict of the same shape; equal parameter counts are asserted. Compiled mode
wraps forward + loss in ``torch.compile``; the optimizer step stays eager in both. The AdamW
step is the one each library's trainer builds (``--optimizer own``, the default: vlp's
``build_optimizer`` takes PyTorch's fused kernel, open_clip_train's ``main.py`` the default
implementation) or one plain ``torch.optim.AdamW`` on both sides (``--optimizer same``: the
model code alone); each result names the implementation each side ran.

Each (library, model, mode) runs in its own worker process so memory numbers do not mix; the
two libraries' workers of a configuration are alive together and take turns (ABBA order) for
every timed repeat, so drift and other load on the machine hit both alike. Reported: median
samples/s over repeats, and on CPU also the process CPU time per sample (less sensitive to
time-slicing by other processes than wall time); ratios are vlp / open_clip from the same run.

Precision: fp32 on CPU, bf16 autocast on CUDA. Memory, over the timed steps only (the peak is
reset after warmup, so compilation is excluded; its wall time shows in ``first_step_s``):
on CUDA ``peak_memory_mb`` is ``max_memory_allocated`` (parameters, gradients, AdamW state,
activations); on CPU it is the peak resident set size (VmHWM, reset through
/proc/self/clear_refs) minus the worker's RSS before its model was built, i.e. the same things
plus allocator slack and, when compiled, the loaded kernels. ``step_peak_memory_mb`` is that
peak minus the memory held just before the timed steps (parameters + optimizer state): what a
step adds on top (activations, gradients).
Results (device named) go to benchmarks/results/train_throughput_<device>.json.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from workers import (  # noqa: E402
    WorkerError,
    WorkerProcess,
    device_name,
    load_average,
    reset_peak_rss,
    rss_kb,
    serve,
    write_result,
)

LIBRARIES = ("vlp", "open_clip")
# vlp preset and the open_clip model config dict of the identical architecture
MODELS = {"clip-tiny": "clip-tiny", "vit-b-32": "clip-vit-b-32"}
DEFAULT_BATCH = {"cpu": {"clip-tiny": 32, "vit-b-32": 8},
                 "cuda": {"clip-tiny": 256, "vit-b-32": 128}}
DEFAULT_STEPS = {"clip-tiny": 10, "vit-b-32": 1}  # training steps per timed repeat


def open_clip_config(model: str) -> dict:
    """open_clip ``CLIP(**cfg)`` arguments with the same shape as the vlp preset."""
    if model == "vit-b-32":
        import open_clip

        return open_clip.get_model_config("ViT-B-32")  # its own config file; gelu, argmax pool
    if model == "clip-tiny":  # written out from vlp's clip-tiny preset, checked by param count
        return {
            "embed_dim": 128,
            "quick_gelu": False,
            "vision_cfg": {"image_size": 64, "patch_size": 16, "width": 128, "layers": 4,
                           "head_width": 32, "mlp_ratio": 4.0, "pool_type": "tok"},
            "text_cfg": {"context_length": 32, "vocab_size": 1024, "width": 128, "heads": 4,
                         "layers": 4, "mlp_ratio": 4.0, "pad_id": 0, "eos_id": 1,
                         "pool_type": "eos"},
        }
    raise ValueError(f"unknown model {model!r}; expected one of {sorted(MODELS)}")


# -- worker: one library, one model, one mode ------------------------------------------------------

def make_inputs(config, batch: int, text_tokens: int, device: torch.device):
    """The same seeded images and ids in every worker: random ids, eos last, no padding."""
    generator = torch.Generator().manual_seed(1234)
    size = config.vision.image_size
    pixels = torch.randn(batch, 3, size, size, generator=generator)
    text = config.text
    ids = torch.randint(3, text.vocab_size - 1, (batch, text_tokens), generator=generator)
    ids[:, text_tokens - 1] = text.eos_id
    if text_tokens < text.context_length:
        pad = torch.full((batch, text.context_length - text_tokens), text.pad_id)
        ids = torch.cat([ids, pad], dim=1)
    return pixels.to(device), ids.to(device)


def build(library: str, model: str, device: torch.device):
    """(module, loss function of (pixels, ids)) with a fresh seeded random init."""
    torch.manual_seed(0)
    if library == "vlp":
        from vlp.config import get_preset
        from vlp.models import build_model

        module = build_model(get_preset(MODELS[model])).to(device).train()

        def loss_fn(pixels, ids):
            return module({"pixels": pixels, "input_ids": ids})["loss"]
    else:
        import open_clip

        module = open_clip.CLIP(**open_clip_config(model)).to(device).train()
        criterion = open_clip.ClipLoss()

        def loss_fn(pixels, ids):
            image, text, scale = module(pixels, ids)
            return criterion(image, text, scale)
    return module, loss_fn


def build_optimizer(library: str, module: torch.nn.Module, kind: str) -> torch.optim.Optimizer:
    """``own``: AdamW as each library's trainer builds it -- vlp's ``build_optimizer`` (two
    groups, PyTorch's fused kernel where it has one), open_clip_train's (gains and biases
    undecayed, PyTorch's default implementation: a per-tensor loop on CPU, ``foreach`` on CUDA);
    ``same``: one plain ``torch.optim.AdamW`` over every parameter on both sides."""
    lr, decay = 1e-4, 0.1
    if kind == "same":
        return torch.optim.AdamW(module.parameters(), lr=lr, weight_decay=decay)
    if library == "vlp":
        from vlp.train.optim import build_optimizer as vlp_optimizer

        return vlp_optimizer(module, lr, decay)
    named = list(module.named_parameters())

    def exclude(name, param):  # open_clip_train/main.py's rule for gains and biases
        return (param.ndim < 2 or "bn" in name or "ln" in name or "bias" in name
                or "logit_scale" in name)
    return torch.optim.AdamW(
        [{"params": [p for n, p in named if exclude(n, p)], "weight_decay": 0.0},
         {"params": [p for n, p in named if not exclude(n, p)], "weight_decay": decay}],
        lr=lr, betas=(0.9, 0.98), eps=1e-6)


def optimizer_implementation(optimizer: torch.optim.Optimizer) -> str:
    defaults = optimizer.defaults
    return ("fused" if defaults.get("fused") else "foreach" if defaults.get("foreach")
            else "default (per-tensor loop on CPU, foreach on CUDA)")


def worker(conn, library: str, model: str, batch: int, text_tokens: int | None, device: str,
           compiled: bool, threads: int, optimizer_kind: str = "own") -> None:
    """Serve ("warmup", n), ("time", n), ("memory",), ("quit",) requests over ``conn``."""
    def start():
        torch.set_num_threads(threads)
        device_ = torch.device(device)
        from vlp.config import get_preset

        config = get_preset(MODELS[model])
        pixels, ids = make_inputs(config, batch, text_tokens or config.text.context_length,
                                  device_)
        baseline_kb = rss_kb("VmRSS")
        module, loss_fn = build(library, model, device_)
        optimizer = build_optimizer(library, module, optimizer_kind)
        step_fn = torch.compile(loss_fn) if compiled else loss_fn
        autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device_.type == "cuda")
        memory = {"method": None, "resident_kb": 0}

        def steps(n: int) -> tuple[list[float], float]:
            times, cpu = [], time.process_time()
            for _ in range(n):
                start = time.perf_counter()
                with autocast:
                    loss = step_fn(pixels, ids)
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                if device_.type == "cuda":
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - start)
            return times, time.process_time() - cpu

        def handle(request: tuple) -> dict | None:
            if request[0] == "warmup":
                times, _ = steps(request[1])
                if device_.type == "cuda":
                    torch.cuda.reset_peak_memory_stats()
                    memory.update(method="cuda_max_memory_allocated",
                                  resident_kb=torch.cuda.memory_allocated() // 1024)
                elif reset_peak_rss():
                    memory.update(method="vmhwm_over_timed_steps_minus_rss_before_model",
                                  resident_kb=rss_kb("VmRSS"))
                else:  # cannot reset the high-water mark: the peak includes warmup/compile
                    memory.update(method="ru_maxrss_whole_worker_minus_rss_before_model",
                                  resident_kb=rss_kb("VmRSS"))
                return {"times": times}
            if request[0] == "time":
                times, cpu_s = steps(request[1])
                return {"times": times, "cpu_s": cpu_s}
            if request[0] == "memory":
                base = baseline_kb
                if device_.type == "cuda":
                    peak_kb, base = torch.cuda.max_memory_allocated() // 1024, 0
                elif memory["method"].startswith("vmhwm"):
                    peak_kb = rss_kb("VmHWM")
                else:
                    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
                return {"peak_mb": round((peak_kb - base) / 1024, 1),
                        "step_peak_mb": round((peak_kb - memory["resident_kb"]) / 1024, 1),
                        "method": memory["method"]}
            return None
        return {"parameters": sum(p.numel() for p in module.parameters()),
                "optimizer": optimizer_implementation(optimizer),
                "inputs_checksum": [float(pixels.double().sum()), int(ids.sum())]}, handle
    serve(conn, start)


# -- parent: start the two workers of a configuration, alternate them ------------------------------

def measure(context, model: str, batch: int, steps: int, compiled: bool, args) -> dict:
    """Both libraries on one configuration: warmup each, then ABBA-ordered timed repetitions."""
    row: dict = {"model": model, "vlp_preset": MODELS[model], "mode":
                 "compiled" if compiled else "eager", "batch_size": batch,
                 "steps_per_repeat": steps}
    workers = {name: WorkerProcess(context, name, worker, library=name, model=model,
                                   batch=batch, text_tokens=args.text_tokens,
                                   device=args.device, compiled=compiled, threads=args.threads,
                                   optimizer_kind=args.optimizer)
               for name in LIBRARIES}
    timeout = args.compile_timeout if compiled else args.step_timeout
    on_cpu = torch.device(args.device).type == "cpu"
    try:
        info = {name: w.ask(None, args.step_timeout) for name, w in workers.items()}
        params = {name: i["parameters"] for name, i in info.items()}
        assert params["vlp"] == params["open_clip"], f"parameter counts differ: {params}"
        assert info["vlp"]["inputs_checksum"] == info["open_clip"]["inputs_checksum"]
        row["parameters_m"] = round(params["vlp"] / 1e6, 3)
        # both warm up (and compile) at once: compilation is mostly single-threaded Python
        for w in workers.values():
            w.conn.send(("warmup", args.warmup))
        warm = {name: w.answer(("warmup",), timeout)["times"] for name, w in workers.items()}
        per_rep: dict[str, list[float]] = {name: [] for name in LIBRARIES}
        cpu_per_sample: dict[str, list[float]] = {name: [] for name in LIBRARIES}
        for rep in range(args.repeats):
            order = LIBRARIES if rep % 2 == 0 else LIBRARIES[::-1]
            for name in order:
                answer = workers[name].ask(("time", steps), args.step_timeout)
                per_rep[name].append(batch * len(answer["times"]) / sum(answer["times"]))
                cpu_per_sample[name].append(answer["cpu_s"] / (batch * len(answer["times"])))
        memory = {name: w.ask(("memory",), args.step_timeout) for name, w in workers.items()}
        for name in LIBRARIES:
            row[name] = {
                "samples_per_s": round(statistics.median(per_rep[name]), 2),
                "samples_per_s_reps": [round(v, 2) for v in per_rep[name]],
                "optimizer": info[name]["optimizer"],
                "first_step_s": round(warm[name][0], 2),
                "peak_memory_mb": memory[name]["peak_mb"],
                "step_peak_memory_mb": memory[name]["step_peak_mb"],
            }
            if on_cpu:  # host CPU time says little about a GPU run
                row[name]["cpu_ms_per_sample"] = round(
                    1e3 * statistics.median(cpu_per_sample[name]), 2)
        row["memory_method"] = memory["vlp"]["method"]
        row["ratio_samples_per_s"] = round(row["vlp"]["samples_per_s"]
                                           / row["open_clip"]["samples_per_s"], 3)
        row["ratio_samples_per_s_best"] = round(max(per_rep["vlp"]) / max(per_rep["open_clip"]),
                                                3)
        # each repeat's two runs are adjacent in time: the median of their ratios is the
        # figure least moved by other load on a shared machine
        row["ratio_samples_per_s_paired"] = round(statistics.median(
            a / b for a, b in zip(per_rep["vlp"], per_rep["open_clip"], strict=True)), 3)
        if on_cpu:
            row["ratio_cpu_time_per_sample"] = round(row["vlp"]["cpu_ms_per_sample"]
                                                     / row["open_clip"]["cpu_ms_per_sample"], 3)
        row["ratio_peak_memory"] = round(row["vlp"]["peak_memory_mb"]
                                         / row["open_clip"]["peak_memory_mb"], 3)
    except (WorkerError, TimeoutError, AssertionError) as error:
        row["error"] = str(error)
        if isinstance(error, WorkerError):
            row["traceback_tail"] = error.answer.get("traceback_tail")
    finally:
        for w in workers.values():
            w.stop()
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--batch", type=int, help="default: per model, see DEFAULT_BATCH")
    parser.add_argument("--steps", type=int,
                        help="training steps per timed repeat (default: per model)")
    parser.add_argument("--repeats", type=int, default=6,
                        help="timed repeats per library (even: ABBA order balances)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps (compile happens)")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                        help="also measure torch.compile'd forward+loss")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--text-tokens", type=int,
                        help="real tokens per caption, the rest padding (default: full context)")
    parser.add_argument("--compile-timeout", type=float, default=600.0,
                        help="seconds allowed for the warmup (compilation) of one worker")
    parser.add_argument("--step-timeout", type=float, default=300.0)
    parser.add_argument("--optimizer", choices=("own", "same"), default="own",
                        help="own: AdamW as each library's trainer builds it (vlp: fused "
                             "kernel); same: one plain torch AdamW on both sides")
    parser.add_argument("--out", help="default: benchmarks/results/train_throughput_<device>.json")
    args = parser.parse_args()
    device = torch.device(args.device)
    context = mp.get_context("spawn")
    results = []
    load_before = load_average()
    modes = [False, True] if args.compile else [False]
    for compiled in modes:
        for model in args.models:
            batch = args.batch or DEFAULT_BATCH.get(device.type, DEFAULT_BATCH["cpu"])[model]
            start = time.perf_counter()
            steps = args.steps or DEFAULT_STEPS[model]
            row = measure(context, model, batch, steps, compiled, args)
            row["wall_s"] = round(time.perf_counter() - start, 1)
            print(json.dumps({k: v for k, v in row.items() if k != "traceback_tail"}),
                  flush=True)
            results.append(row)
    import open_clip

    report = {
        "benchmark": "CLIP training step (forward + contrastive loss + backward + AdamW), "
                     "vlp vs open_clip, same shape, batch, inputs and precision",
        "device": device_name(device, args.threads),
        "torch": torch.__version__,
        "open_clip_version": open_clip.__version__,
        "threads": args.threads,
        "load_average_1_5_15min": {"before": load_before, "after": load_average()},
        "precision": "bf16 autocast" if device.type == "cuda" else "fp32",
        "protocol": {"warmup_steps": args.warmup, "warmup": "both libraries at once",
                     "repeats": args.repeats, "order": "ABBA across repeats",
                     "statistic": "median of per-repeat samples/s; paired ratio: median of "
                                  "per-repeat vlp/open_clip ratios; best: ratio of the fastest "
                                  "repeats",
                     "optimizer": {"own": "AdamW as each library's trainer builds it",
                                   "same": "one plain torch.optim.AdamW on both sides"}[
                                       args.optimizer],
                     "text": (f"{args.text_tokens} real tokens, rest padding" if args.text_tokens
                              else "full context, no padding")},
        "results": results,
    }
    out = write_result(report, args.out, f"train_throughput_{device.type}.json")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
