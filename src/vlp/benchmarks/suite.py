"""`vlp benchmark`: a model (anything `vlp.load` takes) on one task or a suite of tasks, and
the files a suite writes: ``results.json``, ``results.csv``, ``results.md`` (model, dataset,
split, number of items, protocol and metrics) and the official servers' result files
(``<name>_captions_results.json``: ``[{"image_id", "caption"}]``;
``<name>_vqa_results.json``: ``[{"question_id", "answer"}]``).

A suite file is a JSON list (YAML too, when PyYAML is installed) of objects whose keys are
`vlp.benchmarks.tasks.BenchmarkTask`'s fields; a relative ``root`` is read from the suite
file's directory.
"""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path
from typing import Any

import torch

from vlp.benchmarks.tasks import (
    BenchmarkTask,
    Outcome,
    check_files,
    result_name,
    run_task,
    settings_given,
    task_fields,
)
from vlp.cliargs import read_json_or_yaml
from vlp.errors import ConfigError, VlpError
from vlp.store.files import atomic_write_text

HEADLINE = {  # task -> the metrics the markdown table shows
    "zeroshot": ("zeroshot_top1", "zeroshot_top5"),
    "linear-probe": ("probe_top1", "probe_l2"),
    "few-shot": (),  # every fewshot_k*_mean
    "retrieval": ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10",
                  "itm_i2t_r1", "itm_t2i_r1"),
    "captioning": ("bleu_4", "meteor", "rouge_l", "cider"),
    "vqa": ("vqa_accuracy",),
}


def load_benchmark_model(name: str, device: str | None = None) -> tuple[Any, Any]:
    """``(model on device, tokenizer or None)`` for a model name, directory or hub name."""
    from vlp.factory import load_model_and_transforms
    from vlp.hub import resolve

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, tokenizer, _ = load_model_and_transforms(resolve(name), map_location=device)
    return model.to(device), tokenizer


def read_suite(path: str | os.PathLike[str], defaults: dict[str, Any] | None = None
               ) -> list[BenchmarkTask]:
    """The tasks of a suite file (``defaults``: field values an entry does not set)."""
    path = Path(path)
    entries = read_json_or_yaml(path, "suite", "JSON: a list of task objects")
    if not isinstance(entries, list) or not entries:
        raise ConfigError(f"{path}: expected a non-empty list of task objects "
                          f'({{"task": ..., "format": ..., "root": ...}})')
    fields, tasks = task_fields(), []
    for index, entry in enumerate(entries):
        where = f"{path}: task {index}"
        if not isinstance(entry, dict):
            raise ConfigError(f"{where}: expected an object, got {type(entry).__name__}")
        unknown = sorted(set(entry) - fields)
        if unknown:
            raise ConfigError(f"{where}: unknown key(s) {unknown}; expected some of "
                              f"{sorted(fields)}")
        values = {**(defaults or {}), **entry}
        for key in ("l2_grid", "shots"):
            if isinstance(values.get(key), list):
                values[key] = tuple(values[key])
        if values.get("root") and not Path(values["root"]).is_absolute():
            values["root"] = str(path.parent / values["root"])
        spec = BenchmarkTask(**values)
        spec.check(where)
        tasks.append(spec)
    names = [result_name(spec) for spec in tasks]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise ConfigError(f"{path}: tasks {repeated} share a result name; give each its own "
                          f'"name"')
    return tasks


def write_server_file(out: Path, outcome: Outcome) -> str | None:
    """The official server's result file of a captioning or VQA outcome; its path."""
    if outcome.server is None:
        return None
    kind, rows = outcome.server
    path = out / f"{outcome.result['name']}_{kind}_results.json"
    atomic_write_text(path, json.dumps(rows) + "\n")
    return str(path)


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    if isinstance(value, dict | list):
        return json.dumps(value)
    return "" if value is None else str(value)


def _headline(result: dict[str, Any]) -> str:
    keys = HEADLINE.get(result["task"], ()) or [k for k in result if k.endswith("_mean")]
    return ", ".join(f"{k}={_cell(result[k])}" for k in keys if k in result)


def write_tables(out: Path, results: list[dict[str, Any]]) -> None:
    """``results.json``, ``results.csv`` (one row per task, every metric a column) and
    ``results.md`` (the headline metrics and the protocol of each task)."""
    atomic_write_text(out / "results.json", json.dumps(results, indent=2) + "\n")
    columns = list(dict.fromkeys(k for result in results for k in result))
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(columns)
    writer.writerows([_cell(result.get(c)) for c in columns] for result in results)
    atomic_write_text(out / "results.csv", buffer.getvalue())
    lines = ["| model | task | dataset | split | items | metrics | protocol |",
             "| --- | --- | --- | --- | ---: | --- | --- |"]
    for r in results:
        protocol = "; ".join(f"{k}={_cell(v)}" for k, v in r["protocol"].items()
                             if k != "templates")
        if "templates" in r["protocol"]:
            protocol += f"; templates={len(r['protocol']['templates'])}"
        cells = [r["model"], r["task"], r["dataset"], r["split"], str(r["num_items"]),
                 _headline(r), protocol]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    atomic_write_text(out / "results.md", "\n".join(lines) + "\n")


def benchmark(model_name: str, tasks: list[BenchmarkTask], *, out: str | None = None,
              device: str | None = None, progress: bool = True) -> list[dict[str, Any]]:
    """Every task's result for one model; with ``out``, the result tables and server files
    are written there (each result names its server file under ``result_file``)."""
    model, tokenizer = load_benchmark_model(model_name, device)
    out_dir = Path(out) if out else None
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
    results = []
    for spec in tasks:
        outcome = run_task(model, tokenizer, spec, model_name=model_name, progress=progress)
        if out_dir is not None and outcome.server is not None:
            outcome.result["result_file"] = write_server_file(out_dir, outcome)
        results.append(outcome.result)
    if out_dir is not None:
        write_tables(out_dir, results)
    return results


def training_eval_fn(spec: Any, suite: str | None, *, output_dir: str, num_workers: int = 0,
                     progress: bool = True) -> Any:
    """`vlp train`'s evaluation: an ``eval_fn(model, tokenizer, step)`` for the trainer that
    scores what the evaluation flags ask (``spec``, a `vlp.eval.suite.EvalSpec`, checked
    already) and then, with ``--eval-suite``, every task of the ``suite`` file on the model
    being trained; None when neither asks for anything. The suite and each task's files are
    read here, before training starts. Each task's numbers come back as ``<name>/<metric>``
    (``coco/cider``); its result tables and server files land in
    ``output_dir/benchmarks/step-NNNNNNN/``."""
    from vlp.eval.suite import evaluate as evaluate_spec

    flags = None if spec.is_empty() else spec
    if suite is None:
        return None if flags is None else (lambda model, tokenizer, step:
                                           evaluate_spec(model, tokenizer, flags))
    tasks = read_suite(suite, {"num_workers": num_workers})
    for index, task in enumerate(tasks):
        where = f"{suite}: task {index}"
        try:
            check_files(task, where)
        except VlpError as error:  # the reader names the file; this names the suite entry
            raise type(error)(error if str(error).startswith(where) else f"{where}: {error}"
                              ) from None
    out = Path(output_dir) / "benchmarks"

    def evaluate(model: Any, tokenizer: Any, step: int) -> dict[str, Any]:
        metrics = evaluate_spec(model, tokenizer, flags) if flags is not None else {}
        step_dir = out / f"step-{step:07d}"
        step_dir.mkdir(parents=True, exist_ok=True)
        results = []
        for task in tasks:
            outcome = run_task(model, tokenizer, task, model_name=f"{output_dir} step {step}",
                               progress=progress)
            if outcome.server is not None:
                outcome.result["result_file"] = write_server_file(step_dir, outcome)
            results.append(outcome.result)
            name = outcome.result["name"]
            metrics.update({f"{name}/{key}": value for key, value in outcome.result.items()
                            if isinstance(value, int | float) and not isinstance(value, bool)})
        write_tables(step_dir, results)
        return metrics

    return evaluate


def benchmark_from_args(args: Any) -> dict[str, Any]:
    """`vlp benchmark`'s answer: one task's result, or a suite's summary."""
    from vlp.cliargs import config_from_args

    progress = not args.no_progress
    if args.suite:
        if not args.out:
            raise ConfigError("vlp benchmark --suite: give --out DIR for the result files")
        tasks = read_suite(args.suite, {"num_workers": args.num_workers,
                                        **settings_given(args)})
        results = benchmark(args.model, tasks, out=args.out, device=args.device,
                            progress=progress)
        return {"model": args.model, "out": args.out, "tasks": len(results),
                "results": results}
    spec = config_from_args(BenchmarkTask, args, num_workers=args.num_workers)
    spec.check()
    return benchmark(args.model, [spec], out=args.out, device=args.device,
                     progress=progress)[0]


def add_benchmark_args(parser: Any, model_help: str) -> None:
    """`vlp benchmark`'s flags: the model, --suite/--out/--device and every task field."""
    from vlp.cliargs import add_config_args

    parser.add_argument("model", help=model_help)
    parser.add_argument("--suite", metavar="FILE", help="JSON (or YAML) list of tasks, each "
                        "an object of the task flags' names (task, format, root, ...)")
    parser.add_argument("--out", metavar="DIR", help="write results.json/.csv/.md and the "
                        "evaluation servers' result files here (required with --suite)")
    parser.add_argument("--device", help="cuda or cpu (default: cuda when available)")
    add_config_args(parser, BenchmarkTask, exclude=("num_workers",))
