"""Standard benchmarks read from their released files (ImageNet, CIFAR, COCO and Flickr30k
Karpathy splits, NoCaps, VQAv2, OK-VQA), scored by `vlp.eval`: zero-shot classification,
retrieval, captioning, VQA, linear probe and few-shot; `vlp benchmark` runs them."""

from vlp.benchmarks.suite import benchmark, load_benchmark_model, read_suite
from vlp.benchmarks.tasks import FORMATS, TASK_FORMATS, BenchmarkTask, run_task

__all__ = ["FORMATS", "TASK_FORMATS", "BenchmarkTask", "benchmark", "load_benchmark_model",
           "read_suite", "run_task"]
