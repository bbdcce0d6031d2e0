"""Fixtures shared by several test files; each file opts in by name."""

import os
import shutil

import pytest
import torch

# Reference models from transformers' from_pretrained run their plain PyTorch modules, as
# vlp's frozen towers do: transformers 5 otherwise swaps layers for kernels fetched from the
# Hub (tests run offline) and refuses to load without the `kernels` package; 4.57 never did.
os.environ.setdefault("USE_HUB_KERNELS", "NO")


@pytest.fixture
def one_thread():
    """One intra-op torch thread for the test: a shared 2-core box stalls when oversubscribed."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def large_tmp_path(tmp_path):
    """A directory for the test's large files (full-size checkpoints, about 1 GB each), removed
    when the test ends, pass or fail; the rest of `tmp_path` stays, as pytest keeps the last
    three runs' directories."""
    path = tmp_path / "large"
    path.mkdir()
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def synthetic_train_csv(tmp_path_factory):
    """``make(n_train)``: the train.csv of a small synthetic world (64 px images, one caption
    each, 8 val and 8 test images), written once per size for the whole session."""
    from vlp.data.synthetic import write_dataset

    made = {}

    def make(n_train: int):
        if n_train not in made:
            out = tmp_path_factory.mktemp(f"synthetic{n_train}")
            write_dataset(out, formats=["csv"], n_train=n_train, n_val=8, n_test=8,
                          image_size=64, captions_per_image=1, progress=False)
            made[n_train] = out / "train.csv"
        return made[n_train]

    return make


@pytest.fixture
def bench(capsys):
    """``bench(model, *argv)``: `vlp benchmark MODEL ...` in process on the CPU (no progress, no
    workers, batch 16); asserts exit 0 and returns the printed JSON."""
    import json

    from vlp.cli import main

    def run(model, *argv):
        capsys.readouterr()
        code = main(["benchmark", model, "--no-progress", "--num-workers", "0", "--batch-size",
                     "16", "--device", "cpu", *map(str, argv)])
        captured = capsys.readouterr()
        assert code == 0, captured.err
        return json.loads(captured.out)

    return run
