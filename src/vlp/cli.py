"""The ``vlp`` command line: each subcommand is a thin shell over a library function."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from typing import Any, NoReturn

from vlp.cliargs import (
    add_config_args,
    add_decode_args,
    apply_config_file,
    config_from_args,
    positive_int,
)
from vlp.errors import VlpError, print_error


def _print_json(data: dict[str, Any]) -> None:
    print(json.dumps(data, sort_keys=False, default=str))


# EvalSpec fields that are not flags of their own: file lists, source columns, shared flags
MODEL_HELP = ("model or run directory, or a pretrained name: hf-hub:ORG/REPO[@REVISION], "
              "open_clip:ARCH/TAG (vlp models lists the known ones)")
TEMPLATES_HELP = ("one prompt template with '{}' per line (default: the image folder's "
                  "templates.txt, else 'a photo of a {}.' and three like it)")
EVAL_PREFIX = "eval."  # EvalSpec's dests; vlp train has a batch_size of its own
EVAL_NOT_FLAGS = ("classnames", "templates", "retrieval_options", "vqa_candidates",
                  "num_workers", "progress")


def _eval_spec(args: argparse.Namespace, progress: bool) -> Any:
    from vlp.eval.suite import EvalSpec

    return config_from_args(
        EvalSpec, args, EVAL_PREFIX,
        classnames=_read_lines(args.classnames) if args.classnames else None,
        templates=_read_lines(args.templates) if args.templates else None,
        retrieval_options={"image_key": args.image_key, "caption_key": args.caption_key,
                           "separator": args.separator, "image_root": args.image_root},
        vqa_candidates=_read_lines(args.vqa_candidates) if args.vqa_candidates else None,
        num_workers=args.num_workers,
        progress=progress,
    )


def _read_lines(path: str) -> list[str]:
    from vlp.data.records import read_lines

    return read_lines(path)


def _add_eval_args(p: argparse.ArgumentParser) -> None:
    """Every EvalSpec flag (`vlp eval`, and `vlp train`'s evaluation while it trains)."""
    from vlp.eval.suite import EvalSpec

    add_config_args(p, EvalSpec, exclude=EVAL_NOT_FLAGS,
                    flags={"batch_size": ("--eval-batch-size",)}, prefix=EVAL_PREFIX)
    g = p.add_argument_group("evaluation files")
    g.add_argument("--classnames", metavar="FILE",
                   help="one class name per line (default: the folder names, '_' -> ' ')")
    g.add_argument("--templates", metavar="FILE",
                   help=TEMPLATES_HELP)
    g.add_argument("--vqa-candidates", metavar="FILE", help="one candidate answer per line")


def _add_source_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data columns")
    g.add_argument("--image-key", help="CSV/JSONL column holding the image path "
                                       "(default: filepath for CSV, image for JSONL)")
    g.add_argument("--caption-key", help="CSV/JSONL column holding the caption (default: caption)")
    g.add_argument("--separator", help="CSV separator (default: tab for .tsv, else comma)")
    g.add_argument("--image-root", help="root of relative image paths / COCO image directory")


def _load_model_and_tokenizer(path: str) -> tuple[Any, Any]:
    import vlp

    model = vlp.load(path)
    return model, vlp.load_tokenizer(path)


# ---------------------------------------------------------------------------------------
# subcommands


def cmd_data_synth(args: argparse.Namespace) -> int:
    from vlp.data.synthetic import write_dataset

    formats = [f.strip() for f in args.format.split(",") if f.strip()]
    meta = write_dataset(args.out, formats=formats, n_train=args.train, n_val=args.val,
                         n_test=args.test, seed=args.seed, image_size=args.image_size,
                         captions_per_image=args.captions_per_image,
                         noisy_fraction=args.noisy_fraction, progress=not args.no_progress)
    _print_json({"out": str(args.out), "counts": meta.get("counts"),
                 "duplicate_caption_share": meta.get("duplicate_caption_share")})
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from vlp.run import train
    from vlp.train import TrainConfig

    cfg = config_from_args(TrainConfig, args)
    from vlp.hub import is_pretrained_name, resolve
    from vlp.train.distributed import shutdown

    # a hub name: its converted directory (the tokenizer's: that directory's tokenizer files)
    for field in ("model", "init_vision", "init_text", "tokenizer"):
        if is_pretrained_name(getattr(cfg, field)):
            setattr(cfg, field, str(resolve(getattr(cfg, field))))
    spec = _eval_spec(args, progress=cfg.progress)
    if spec.caption_prompt is None:  # captions are evaluated after the prompt they learn
        spec.caption_prompt = cfg.lm_prompt
    spec.check()  # every evaluation file read before the first step
    from vlp.benchmarks.suite import training_eval_fn  # and --eval-suite's, here

    eval_fn = training_eval_fn(spec, args.eval_suite, output_dir=cfg.output_dir,
                               num_workers=cfg.num_workers, progress=cfg.progress)
    try:
        result = train(cfg, eval_fn=eval_fn)
    finally:
        shutdown()
    if int(os.environ.get("RANK", "0")) == 0:  # under torchrun, one answer
        _print_json(result)
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from vlp.errors import ConfigError
    from vlp.eval.suite import evaluate

    spec = _eval_spec(args, progress=not args.no_progress)
    if spec.is_empty():
        raise ConfigError("vlp eval: give at least one of --zeroshot-data, --retrieval-data, "
                          "--caption-data, --vqa-data")
    model, tokenizer = _load_model_and_tokenizer(args.checkpoint)
    metrics = evaluate(model, tokenizer, spec)
    _print_json({"checkpoint": args.checkpoint, **_decoding(spec.fast_decode), **metrics})
    return 0


def _decoding(fast_decode: bool) -> dict[str, Any]:
    """What an evaluation's answer says of its image decoding: ``fast_decode`` when on (the
    numbers then differ slightly from the exact preprocessing's)."""
    return {"fast_decode": True} if fast_decode else {}


def cmd_zeroshot(args: argparse.Namespace) -> int:
    from vlp.eval import zeroshot_eval

    model, tokenizer = _load_model_and_tokenizer(args.checkpoint)
    metrics = zeroshot_eval(model, tokenizer, args.data,
                            classnames=_read_lines(args.classnames) if args.classnames else None,
                            templates=_read_lines(args.templates) if args.templates else None,
                            batch_size=args.eval_batch_size, num_workers=args.num_workers,
                            progress=not args.no_progress, fast_decode=args.fast_decode)
    _print_json({"checkpoint": args.checkpoint, **_decoding(args.fast_decode), **metrics})
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from vlp.config import get_preset, list_presets
    from vlp.hub import list_pretrained, preset_parameters

    rows = [{"name": name, "kind": "preset", "family": get_preset(name).family,
             "parameters": preset_parameters(name), "source": "random init (vlp preset)"}
            for name in list_presets()]
    rows += [{"name": known.name, "kind": "pretrained", "family": known.family,
              "parameters": known.parameters(), "source": known.source}
             for known in list_pretrained()]
    if args.json:
        for row in rows:
            _print_json(row)
        return 0
    width = max(len(row["name"]) for row in rows)
    for row in rows:
        count = row["parameters"]
        shown = f"{count / 1e6:9.1f}M" if count is not None else "        -"
        print(f"{row['name']:<{width}}  {row['family']:<7} {shown}  {row['source']}")
    return 0


def cmd_caption(args: argparse.Namespace) -> int:
    from vlp.caption import caption

    options = {k: v for k, v in {"image_key": args.image_key, "image_root": args.image_root,
               "separator": args.separator}.items() if v is not None}
    path = caption(args.checkpoint, args.images, args.out, batch_size=args.batch_size,
                   max_new_tokens=args.max_new_tokens, num_beams=args.num_beams,
                   prompt=args.prompt, num_workers=args.num_workers,
                   progress=not args.no_progress, kind=args.kind,
                   fast_decode=args.fast_decode, **options)
    with open(path) as lines:
        count = sum(1 for _ in lines)
    _print_json({"out": str(path), "count": count})
    return 0


def cmd_benchmark(args: argparse.Namespace) -> int:
    from vlp.benchmarks.suite import benchmark_from_args

    _print_json(benchmark_from_args(args))
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from vlp.serve.options import serve_from_args

    serve_from_args(args)
    return 0


CONVERT_FORMATS = ["vlp", "hf", "open_clip", "lavis"]  # vlp.interop.FORMATS


def cmd_convert(args: argparse.Namespace) -> int:
    import vlp

    path = vlp.convert(args.src, args.dst, src_format=args.src_format,
                       dst_format=args.dst_format, tokenizer=args.tokenizer,
                       image_size=args.image_size, config=args.config,
                       architecture=args.architecture)
    _print_json({"out": str(path), "from": args.src_format, "to": args.dst_format})
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from vlp.recipes import DemoConfig, demo

    cfg = DemoConfig(out=args.out, n_train=args.train, n_test=args.test, steps=args.steps,
                     batch_size=args.batch_size, seed=args.seed, num_workers=args.num_workers,
                     progress=not args.no_progress, family=args.family,
                     vqa_steps=args.vqa_steps)
    result = demo(cfg)
    _print_json(result)
    return 0


def cmd_capfilt(args: argparse.Namespace) -> int:
    from vlp.capfilt import CapfiltConfig, capfilt

    cfg = config_from_args(CapfiltConfig, args)
    if args.stage == "run":
        stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    else:
        stages = [args.stage]
    result = capfilt(cfg, stages=stages)  # unknown stage names are refused there
    _print_json(result)
    return 0


def _add_capfilt_parser(sub: Any) -> None:
    from vlp.capfilt import CapfiltConfig

    cf = sub.add_parser(
        "capfilt", help="bootstrap a noisy dataset with BLIP's CapFilt",
        description="BLIP CapFilt in resumable stages: finetune (captioner LM + filter "
                    "ITC/ITM from a pretrained BLIP on clean pairs), caption (synthetic "
                    "captions per web image), filter (ITM decisions on original and "
                    "synthetic captions), write (dataset + report), pretrain; run: several.")
    cf.add_argument("stage", choices=["finetune", "caption", "filter", "write", "pretrain",
                                      "run"])
    cf.add_argument("--stages", default="caption,filter,write",
                    help="run: comma-separated stages (default: caption,filter,write)")
    add_config_args(cf, CapfiltConfig, required=("out",))
    cf.set_defaults(func=cmd_capfilt)


# ---------------------------------------------------------------------------------------
# parser


class _Parser(argparse.ArgumentParser):
    """Usage errors in one line, as the library's errors (the usage is in --help)."""

    reads_config = False  # a subcommand whose flags may come from --config FILE

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")

    def parse_known_args(self, args: Sequence[str] | None = None,
                         namespace: argparse.Namespace | None = None
                         ) -> tuple[argparse.Namespace, list[str]]:
        if self.reads_config:  # the file's values become the flags' defaults: flags override
            pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
            pre.add_argument("--config")
            given, _ = pre.parse_known_args(list(sys.argv[1:] if args is None else args))
            if given.config is not None:
                apply_config_file(self, given.config, skip=("config",))
        return super().parse_known_args(args, namespace)


def build_parser() -> argparse.ArgumentParser:
    from vlp.train.config import TrainConfig

    parser = _Parser(
        prog="vlp",
        description="Vision-language pretraining: build data, train, evaluate, embed, convert.",
    )
    parser.add_argument("--debug", action="store_true", help="tracebacks (also VLP_DEBUG=1)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--num-workers", type=int, default=TrainConfig.num_workers,
                        help="data loader worker processes (default: %(default)s)")
    common.add_argument("--no-progress", action="store_true", help="hide progress bars")

    # data
    data = sub.add_parser("data", help="dataset utilities")
    data_sub = data.add_subparsers(dest="data_command", metavar="DATA_COMMAND", required=True)
    synth = data_sub.add_parser(
        "synth", parents=[common],
        help="write the built-in synthetic image-caption dataset to disk",
        description="Write the seeded synthetic world (coloured shapes with captions, class "
                    "labels and QA pairs) in real on-disk formats.")
    synth.add_argument("--out", required=True, help="output directory")
    synth.add_argument("--format", default="csv,jsonl,coco,imagefolder,wds",
                       help="comma-separated formats: csv, jsonl, coco, imagefolder, wds")
    synth.add_argument("--train", type=int, default=5000, help="training images")
    synth.add_argument("--val", type=int, default=500, help="validation images")
    synth.add_argument("--test", type=int, default=1000, help="test images (one caption each)")
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--image-size", type=int, default=64)
    synth.add_argument("--captions-per-image", type=int, default=5)
    synth.add_argument("--noisy-fraction", type=float, default=0.0,
                       help="share of captions replaced by mismatched/corrupted text")
    synth.set_defaults(func=cmd_data_synth)

    # train
    tr = sub.add_parser("train", help="train a model",
                        description="Train a model from a preset (or a checkpoint) on "
                                    "image-text data, with checkpoints and exact resume.")
    tr.add_argument("--config", metavar="FILE",
                    help="JSON or YAML object of these options (names without '--', e.g. "
                         "max_steps: 100); flags given beside it override its values; a run's "
                         "train_config.json reruns it")
    tr.reads_config = True
    add_config_args(tr, TrainConfig, required=("train_data",),
                    flags={"keep_last": ("--keep-last", "--keep")},
                    item_flags={"betas": ("--beta1", "--beta2")})
    _add_eval_args(tr)  # --fast-decode there: its evaluation's images only
    tr.add_argument("--eval-suite", metavar="FILE", help="a vlp benchmark suite (JSON/YAML "
                    "list of tasks) run at every evaluation; metrics logged as NAME/METRIC")
    tr.set_defaults(func=cmd_train)

    # eval
    ev = sub.add_parser("eval", parents=[common], help="evaluate a checkpoint",
                        description="Zero-shot classification, retrieval (ITM re-ranked for "
                                    "BLIP), captioning and VQA metrics.")
    ev.add_argument("checkpoint", help=MODEL_HELP)
    _add_eval_args(ev)
    _add_source_args(ev)
    ev.set_defaults(func=cmd_eval)

    zs = sub.add_parser("zeroshot", parents=[common], help="zero-shot classification",
                        description="Top-1/top-5 zero-shot accuracy on an image folder.")
    zs.add_argument("checkpoint", help=MODEL_HELP)
    zs.add_argument("--data", required=True, help="image folder root (class_name/*.jpg)")
    zs.add_argument("--classnames", help="one class name per line")
    zs.add_argument("--templates", metavar="FILE", help=TEMPLATES_HELP)
    zs.add_argument("--eval-batch-size", type=positive_int, default=256)
    add_decode_args(zs)
    zs.set_defaults(func=cmd_zeroshot)

    from vlp.search.options import add_search_parsers

    add_search_parsers(sub, common, MODEL_HELP)  # embed, index, search

    cp = sub.add_parser("caption", parents=[common], help="caption images with a CoCa model",
                        description="Write one generated caption per image as JSONL "
                                    '{"image": id, "caption": text}.')
    cp.add_argument("checkpoint", help=MODEL_HELP)
    cp.add_argument("--images", required=True,
                    help="image directory, CSV/TSV/JSONL/COCO file or shard pattern")
    cp.add_argument("--out", required=True, help="output .jsonl file")
    cp.add_argument("--kind", default="auto",
                    choices=["auto", "csv", "tsv", "jsonl", "coco", "wds"])
    cp.add_argument("--batch-size", type=positive_int, default=32)
    cp.add_argument("--max-new-tokens", type=positive_int, default=20)
    cp.add_argument("--num-beams", type=positive_int, default=3)
    cp.add_argument("--prompt", help="text every caption starts from (left out of the output)")
    add_decode_args(cp)
    _add_source_args(cp)
    cp.set_defaults(func=cmd_caption)

    from vlp.benchmarks.suite import add_benchmark_args

    bm = sub.add_parser("benchmark", parents=[common], help="standard benchmarks from their "
                        "released files", description="Zero-shot, retrieval, captioning, VQA, "
                        "linear probe and few-shot on ImageNet, CIFAR, COCO/Flickr30k "
                        "Karpathy, NoCaps, VQAv2, OK-VQA (or image folders and vlp's files).")
    add_benchmark_args(bm, MODEL_HELP)
    bm.set_defaults(func=cmd_benchmark)

    from vlp.serve.options import add_serve_args

    sv = sub.add_parser("serve", help="serve a model over HTTP (JSON API and a web page)",
                        description="Embed, zero-shot, caption, VQA and ITM over HTTP "
                                    "(what the model's family serves), with dynamic batching, "
                                    "request limits and a web page at /. Needs the serve "
                                    "extra: pip install 'vlp[serve]'.")
    add_serve_args(sv, MODEL_HELP)
    sv.set_defaults(func=cmd_serve)

    cv = sub.add_parser("convert", help="convert checkpoints between vlp, HF, open_clip and "
                                        "original BLIP/LAVIS",
                        description="Convert between formats: CLIP and SigLIP (vlp, hf, "
                                    "open_clip), CoCa (vlp, open_clip), BLIP (vlp, hf, lavis: "
                                    "an original BLIP "
                                    "/ LAVIS .pth), BLIP-2 (vlp, hf: Blip2ForConditional"
                                    "Generation with OPT or T5, Blip2ForImageTextRetrieval) "
                                    "and the lm family (vlp, hf: GPT2LMHeadModel).")
    cv.add_argument("--from", dest="src_format", required=True, choices=CONVERT_FORMATS)
    cv.add_argument("--to", dest="dst_format", required=True, choices=CONVERT_FORMATS)
    cv.add_argument("--tokenizer", help="tokenizer directory, tokenizer.json, or a directory "
                                        "with vocab.json + merges.txt (open_clip sources)")
    cv.add_argument("--image-size", type=positive_int,
                    help="interpolate position embeddings for this input size")
    cv.add_argument("--config", help="open_clip: model config JSON (for a bare weights file); "
                                     "lavis: vlp BLIP preset or config JSON giving the heads "
                                     "and token ids (default by vision width)")
    cv.add_argument("--architecture",
                    help="--to hf, BLIP: the HF class to write (BlipForImageTextRetrieval, "
                         "BlipForConditionalGeneration, BlipForQuestionAnswering; default: the "
                         "one holding exactly the model's parts); --to open_clip, "
                         "SigLIP: the timm model name of the image tower (default: the timm "
                         "SigLIP ViT of the model's shape)")
    cv.add_argument("src", help="source checkpoint directory or file")
    cv.add_argument("dst", help="destination directory (a .pth/.safetensors file for lavis)")
    cv.set_defaults(func=cmd_convert)

    md = sub.add_parser("models", help="list presets and the pretrained names vlp knows",
                        description="Presets (random init) and pretrained hub names, with "
                                    "family, parameters and source. Any other hf-hub:ORG/REPO "
                                    "in a format vlp reads (transformers CLIP, BLIP, BLIP-2, "
                                    "GPT-2; open_clip; vlp) loads too.")
    md.add_argument("--json", action="store_true", help="one JSON object per line")
    md.set_defaults(func=cmd_models)

    from vlp.report.options import add_report_args, cmd_report

    rp = sub.add_parser("report", help="one HTML page of a training run: plots, metrics, "
                        "checkpoints, examples", description="A self-contained HTML report.")
    add_report_args(rp)
    rp.set_defaults(func=cmd_report)

    dm = sub.add_parser("demo", parents=[common], help="synthetic data -> train clip-tiny -> eval",
                        description="End to end on CPU: write the synthetic dataset, train "
                                    "clip-tiny through the real loaders, report held-out "
                                    "zero-shot top-1 and retrieval R@1.")
    dm.add_argument("--out", default="runs/demo", help="directory for data, run and checkpoints")
    dm.add_argument("--train", type=int, default=None, help="training images")
    dm.add_argument("--test", type=int, default=None, help="held-out images")
    dm.add_argument("--steps", type=int, default=None, help="optimizer steps")
    dm.add_argument("--batch-size", type=int, default=None)
    dm.add_argument("--seed", type=int, default=0)
    dm.add_argument("--family", choices=["clip", "coca", "blip", "simvlm", "blip2", "capfilt"],
                    default="clip",
                    help="clip: train clip-tiny; coca: train coca-tiny and also report held-out "
                         "captioning (CIDEr, BLEU-4 on the val split); blip: pretrain blip-tiny, "
                         "fine-tune it for VQA, report retrieval R@1 by ITC vs ITM re-ranking, "
                         "CIDEr vs untrained and VQA accuracy vs the majority answer; "
                         "simvlm: pretrain simvlm-tiny on image-text + text-only data, report "
                         "zero-shot CIDEr and VQA vs baselines and without the text data; "
                         "blip2: frozen clip-tiny ViT + a small LM trained on text, stage 1 "
                         "then stage 2 (--steps), report zero-shot VQA and CIDEr vs the "
                         "majority answer and the LM without the image; capfilt: BLIP's "
                         "CapFilt on 30%%-noisy web captions, then clip-tiny pretrained on "
                         "noisy, bootstrapped and clean data (default: clip)")
    dm.add_argument("--vqa-steps", type=int, default=None,
                    help="blip: VQA fine-tuning steps after pretraining")
    dm.set_defaults(func=cmd_demo)
    _add_capfilt_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except VlpError as error:  # a --config file that cannot be read
        print_error(error, "--debug" in (sys.argv[1:] if argv is None else argv))
        return 2
    try:
        return args.func(args)
    except VlpError as error:  # a user's mistake: one line; a bug stays a traceback
        print_error(error, args.debug)
        return 2
    except KeyboardInterrupt:
        print("vlp: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
