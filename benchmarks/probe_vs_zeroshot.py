"""Linear probe vs zero-shot vs few-shot on the synthetic world's 48 classes, for a clip-tiny
trained for a few minutes and for the same model untrained, all through the `vlp` command.

    .venv/bin/python benchmarks/probe_vs_zeroshot.py [--steps 600] [--train 2000] [--test 500]
                                                     [--out DIR] [--threads 1] [--result PATH]

Steps: `vlp data synth` (csv + imagefolder), `vlp train --model clip-tiny`, then one
`vlp benchmark --suite` per model (zero-shot with the world's templates, linear probe on the
train split's frozen features with the L2 strength chosen on a held-out fifth, few-shot at
k = 1, 2, 4, 8, 16 over 5 seeds) on the held-out test split. The JSON
(benchmarks/results/probe_vs_zeroshot_cpu.json) records the commands, settings, versions,
wall times and the load average; paths in it are relative to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

SHOTS = (1, 2, 4, 8, 16)


def vlp(*argv: str, cwd: Path, threads: int) -> tuple[dict, float, list[str]]:
    """Run ``vlp ARGV`` in ``cwd`` on ``threads`` intra-op threads; its JSON answer, the wall
    time and the command."""
    command = ["vlp", *argv]
    start = time.perf_counter()
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    done = subprocess.run([sys.executable, "-m", "vlp", *argv], cwd=cwd, capture_output=True,
                          text=True, env=env)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1]), time.perf_counter() - start, command


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/bench_probe", help="work directory")
    parser.add_argument("--train", type=int, default=2000, help="training images")
    parser.add_argument("--test", type=int, default=500, help="held-out images")
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-workers", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per command (one "
                        "keeps a shared machine from stalling)")
    parser.add_argument("--result", default=str(Path(__file__).parent / "results"
                                                / "probe_vs_zeroshot_cpu.json"))
    args = parser.parse_args()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    load_before = os.getloadavg()
    settings = {k: v for k, v in vars(args).items() if k not in ("out", "result")}
    record: dict = {"settings": settings | {"shots": list(SHOTS)}, "commands": {},
                    "wall_s": {}}
    workers = ["--num-workers", str(args.num_workers), "--no-progress"]

    _, record["wall_s"]["data"], record["commands"]["data"] = vlp(
        "data", "synth", "--out", "data", "--format", "csv,imagefolder", "--train",
        str(args.train), "--val", "0", "--test", str(args.test), "--seed", str(args.seed),
        *workers, cwd=out, threads=args.threads)
    trained, record["wall_s"]["train"], record["commands"]["train"] = vlp(
        "train", "--model", "clip-tiny", "--train-data", "data/train.csv", "--output-dir", "run",
        "--max-steps", str(args.steps), "--batch-size", str(args.batch_size), "--lr",
        str(args.lr), "--weight-decay", "0.1", "--warmup-steps", str(max(1, args.steps // 10)),
        "--seed", str(args.seed), "--log-every", "100", *workers, cwd=out, threads=args.threads)
    record["train_loss"] = trained["loss"]

    suite = [{"task": "zeroshot", "format": "imagefolder", "root": "data/imagefolder"},
             {"task": "linear-probe", "format": "imagefolder", "root": "data/imagefolder"},
             {"task": "few-shot", "format": "imagefolder", "root": "data/imagefolder",
              "shots": list(SHOTS), "seeds": 5}]
    (out / "suite.json").write_text(json.dumps(suite, indent=1))
    record["suite"] = suite
    untrained = out / "untrained"
    if not untrained.exists():  # the same preset, seed and tokenizer, before any step
        import torch

        import vlp as lib

        torch.manual_seed(args.seed)
        lib.save(lib.create_model("clip-tiny"), untrained,
                 tokenizer=lib.load_tokenizer(out / "run" / "checkpoint-latest"))
    record["results"] = {}
    for name, model in (("trained", "run/checkpoint-latest"), ("untrained", "untrained")):
        _, seconds, command = vlp("benchmark", model, "--suite", "suite.json", "--out",
                                  f"results-{name}", "--device", "cpu", *workers, cwd=out,
                                  threads=args.threads)
        results = json.loads((out / f"results-{name}" / "results.json").read_text())
        by_task = {r["task"]: r for r in results}
        summary = {
            "zeroshot_top1": by_task["zeroshot"]["zeroshot_top1"],
            "zeroshot_top5": by_task["zeroshot"]["zeroshot_top5"],
            "probe_top1": by_task["linear-probe"]["probe_top1"],
            "probe_l2": by_task["linear-probe"]["probe_l2"],
            **{f"fewshot_k{k}_{s}": by_task["few-shot"][f"fewshot_k{k}_{s}"]
               for k in SHOTS for s in ("mean", "std")},
            "num_test_images": by_task["zeroshot"]["num_items"],
            "num_train_images": by_task["linear-probe"]["num_train"],
        }
        summary["probe_minus_zeroshot_top1"] = summary["probe_top1"] - summary["zeroshot_top1"]
        means = [summary[f"fewshot_k{k}_mean"] for k in SHOTS]
        summary["fewshot_rises_with_k"] = means == sorted(means)
        record["results"][name] = summary
        record["commands"][f"benchmark_{name}"] = command
        record["wall_s"][f"benchmark_{name}"] = seconds

    import numpy
    import torch

    import vlp as lib

    record["versions"] = {"vlp": getattr(lib, "__version__", "?"), "torch": torch.__version__,
                          "numpy": numpy.__version__, "python": platform.python_version()}
    record["device"] = f"cpu: {platform.processor() or platform.machine()}, " \
                       f"{os.cpu_count()} cores, {args.threads} torch thread(s) per command"
    record["load_average_1_5_15min"] = {"before": load_before, "after": os.getloadavg()}
    Path(args.result).parent.mkdir(parents=True, exist_ok=True)
    Path(args.result).write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record["results"], indent=2))


if __name__ == "__main__":
    main()
