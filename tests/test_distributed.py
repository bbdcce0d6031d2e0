"""Data-parallel training on real process groups (gloo, CPU): the feature gather, and whole
``torchrun`` runs of `vlp train` compared with one process on the concatenated batch."""

from __future__ import annotations

import itertools
import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from safetensors.torch import load_file

import vlp
from vlp.errors import ConfigError
from vlp.losses import clip_loss, siglip_loss
from vlp.train.distributed import GatherExchange, first_slurm_host, slurm_launch_env

MODES = ("local", "global", "siglip")
LAYOUTS = {"even": (4, 4), "uneven": (3, 5)}  # rows per rank; uneven as after skipped samples


def _features(rows: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    image = F.normalize(torch.randn(sum(rows), 16, generator=generator), dim=-1)
    text = F.normalize(torch.randn(sum(rows), 16, generator=generator), dim=-1)
    return image, text


def _loss(mode: str, image: torch.Tensor, text: torch.Tensor, exchange=None) -> torch.Tensor:
    if mode == "siglip":
        return siglip_loss(image, text, torch.tensor(10.0), torch.tensor(-5.0),
                           exchange=exchange).loss
    return clip_loss(image, text, torch.tensor(10.0), exchange=exchange).loss


def _gather_worker(rank: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        results = {}
        for layout, rows in LAYOUTS.items():
            image, text = _features(rows)
            mine = slice(sum(rows[:rank]), sum(rows[:rank + 1]))
            for mode in MODES:
                img = image[mine].clone().requires_grad_(True)
                txt = text[mine].clone().requires_grad_(True)
                exchange = GatherExchange(local_loss=mode != "global")
                loss = _loss(mode, img, txt, exchange)
                loss.backward()
                results[layout, mode] = (loss.detach(), img.grad, txt.grad)
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_gather_with_grad_matches_one_process(tmp_path: Path) -> None:
    """Averaged over ranks (as DDP averages gradients), each rank's loss and feature gradients
    equal one process's on the concatenated batch; offsets stay right with uneven ranks."""
    mp.spawn(_gather_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for layout, rows in LAYOUTS.items():
        for mode in MODES:
            image, text = _features(rows)
            image.requires_grad_(True)
            text.requires_grad_(True)
            full = _loss(mode, image, text)
            full.backward()
            losses = [ranks[r][layout, mode][0] for r in range(2)]
            if mode == "global":
                for loss in losses:
                    torch.testing.assert_close(loss, full.detach(), atol=1e-6, rtol=1e-6)
            else:  # per-rank means: weighted by rows they make the batch mean
                combined = sum(loss * n / sum(rows) for loss, n in zip(losses, rows))
                torch.testing.assert_close(combined, full.detach(), atol=1e-6, rtol=1e-6)
            if layout == "uneven" and mode != "global":
                continue  # DDP's mean of per-rank means weights uneven ranks differently
            for r in range(2):
                mine = slice(sum(rows[:r]), sum(rows[:r + 1]))
                torch.testing.assert_close(ranks[r][layout, mode][1] / 2, image.grad[mine],
                                           atol=1e-6, rtol=1e-5)
                torch.testing.assert_close(ranks[r][layout, mode][2] / 2, text.grad[mine],
                                           atol=1e-6, rtol=1e-5)


def _blip_worker(rank: int, init_file: str, out_dir: str, family: str = "blip") -> None:
    import importlib

    from vlp.config import get_preset
    from vlp.models import build_model

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        torch.manual_seed(0)  # same weights on both ranks
        blip_module = importlib.import_module(f"vlp.models.{family}")
        model = build_model(get_preset(f"{family}-tiny")).train()
        model.exchange = GatherExchange()
        draws = []
        sample = blip_module.sample_hard_negatives

        def recording(*args, **kwargs):
            drawn = sample(*args, **kwargs)
            draws.append((torch.stack(drawn), kwargs.get("offset"), args[0].shape))
            return drawn

        blip_module.sample_hard_negatives = recording
        torch.manual_seed(1 + rank)  # each rank its own pairs
        text = model.config.text
        ids = torch.randint(3, 1000, (3, 8))
        ids[:, 0], ids[:, -1] = text.bos_id, text.eos_id
        batch = {"pixels": torch.randn(3, 3, 64, 64), "input_ids": ids}
        for _ in range(8):
            model.zero_grad(set_to_none=True)
            out = model.loss(model.features(batch))
            out["loss"].backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        torch.save({"draws": draws, "loss": out["loss"].detach(), "grads": grads},
                   os.path.join(out_dir, f"{family}{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("family", ["blip", "blip2"])
def test_itm_hard_negatives_come_from_every_rank(tmp_path: Path, family: str) -> None:
    """Under a 2-process group BLIP and BLIP-2 draw ITM negatives among both ranks' pairs (never a
    row's own positive), and the step's backward (image tokens gathered with their gradient)
    completes on both ranks."""
    mp.spawn(_blip_worker, args=(str(tmp_path / "init"), str(tmp_path), family), nprocs=2)
    for rank in range(2):
        result = torch.load(tmp_path / f"{family}{rank}.pt")
        assert torch.isfinite(result["loss"])
        assert result["grads"]["itm_head.weight"].abs().sum() > 0
        drawn = set()
        for indices, offset, shape in result["draws"]:
            assert offset == 3 * rank and tuple(shape) == (3, 6)
            assert not (indices == torch.arange(3) + offset).any()
            drawn |= set(indices.flatten().tolist())
        other = set(range(6)) - set(range(3 * rank, 3 * rank + 3))
        assert drawn & other, drawn  # negatives from the other rank's pairs


# ---------------------------------------------------------------------------------------------
# whole runs under torchrun

VLP = [sys.executable, "-m", "vlp"]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
            "2", "-m", "vlp"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
# AdamW's first step is lr * g / (|g| + eps): with the default eps (1e-6) it divides gradients
# near zero by their own size, so fp32 summation-order noise (1e-9) would become 1e-6 in the
# weights. A large eps makes the step proportional to the gradient, which is what we compare.
ONE_STEP = ["--max-steps", "1", "--lr", "1e-3", "--eps", "1e-3", "--num-workers", "0",
            "--no-progress", "--seed", "3"]


def _run(command: list[str], timeout: float = 300) -> dict:
    done = subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def _log(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def data(synthetic_train_csv) -> Path:
    return synthetic_train_csv(96)


@pytest.fixture(scope="module")
def single_step(data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("single") / "run"
    _run([*VLP, "train", "--train-data", str(data), "--output-dir", str(out),
          "--batch-size", "16", *ONE_STEP])
    return out


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_torchrun_step_equals_one_process_on_the_concatenated_batch(
        strategy: str, data: Path, single_step: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    _run([*TORCHRUN, "train", "--train-data", str(data), "--output-dir", str(out),
          "--batch-size", "8", "--strategy", strategy, *ONE_STEP])
    # same samples (8 per rank = the single run's 16), same loss, same weights after the step
    two, one = _log(out)[0], _log(single_step)[0]
    assert (two["samples"], two["index_sum"]) == (one["samples"], one["index_sum"])
    assert abs(two["loss"] - one["loss"]) < 1e-6
    assert abs(two["grad_norm"] - one["grad_norm"]) < 1e-5
    weights_one = load_file(single_step / "checkpoint-0000001" / "model.safetensors")
    weights_two = load_file(out / "checkpoint-0000001" / "model.safetensors")
    assert weights_one.keys() == weights_two.keys()
    worst = max((weights_one[k] - weights_two[k]).abs().max().item() for k in weights_one)
    assert worst <= 1e-6, worst


def test_torchrun_without_gradient_gather_differs(data: Path, single_step: Path,
                                                  tmp_path: Path) -> None:
    """The comparison above can fail: features gathered without gradients lose the other
    rank's loss terms, and the weights move differently."""
    out = tmp_path / "run"
    _run([*TORCHRUN, "train", "--train-data", str(data), "--output-dir", str(out),
          "--batch-size", "8", "--no-gather-with-grad", *ONE_STEP])
    assert abs(_log(out)[0]["loss"] - _log(single_step)[0]["loss"]) < 1e-6  # same forward
    weights_one = load_file(single_step / "checkpoint-0000001" / "model.safetensors")
    weights_two = load_file(out / "checkpoint-0000001" / "model.safetensors")
    worst = max((weights_one[k] - weights_two[k]).abs().max().item() for k in weights_one)
    assert worst > 1e-4


def test_torchrun_with_fine_tuning_levers_equals_one_process(data: Path,
                                                             tmp_path: Path) -> None:
    """Locked towers, layer-wise decay and the weight average under DDP: the 2-rank step's
    trained and averaged weights equal one process's on the concatenated batch."""
    levers = ["--lock-text", "--lock-image", "--lock-image-unlocked-groups", "2",
              "--ema-decay", "0.5", "--layer-decay", "0.8", *ONE_STEP]
    one, two = tmp_path / "one", tmp_path / "two"
    _run([*VLP, "train", "--train-data", str(data), "--output-dir", str(one),
          "--batch-size", "16", *levers])
    _run([*TORCHRUN, "train", "--train-data", str(data), "--output-dir", str(two),
          "--batch-size", "8", *levers])
    for name in ("model.safetensors", "train_weights.safetensors"):
        a = load_file(one / "checkpoint-0000001" / name)
        b = load_file(two / "checkpoint-0000001" / name)
        assert a.keys() == b.keys()
        assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6, name
    raw = load_file(one / "checkpoint-0000001" / "train_weights.safetensors")
    average = load_file(one / "checkpoint-0000001" / "model.safetensors")
    assert not torch.equal(raw["visual.head.weight"], average["visual.head.weight"])


def test_two_process_run_resumes_on_one_process_from_the_same_sample(data: Path,
                                                                      tmp_path: Path) -> None:
    """A checkpoint of a 2-rank run (8 per rank) resumed by one process (16 per batch): the
    remaining steps read the same samples and give the same losses as the 2-rank run."""
    common = ["--train-data", str(data), "--max-steps", "6", "--lr", "1e-3", "--eps", "1e-3",
              "--num-workers", "0", "--no-progress", "--seed", "5"]
    two = tmp_path / "two"
    _run([*TORCHRUN, "train", "--output-dir", str(two), "--batch-size", "8",
          "--checkpoint-every", "3", "--keep", "0", *common])
    one = tmp_path / "one"
    result = _run([*VLP, "train", "--output-dir", str(one), "--batch-size", "16", "--resume",
                   str(two / "checkpoint-0000003"), *common])
    assert result["step"] == 6
    steps_two = {r["step"]: r for r in _log(two) if "loss" in r}
    steps_one = {r["step"]: r for r in _log(one) if "loss" in r}
    assert sorted(steps_one) == [4, 5, 6]
    for step, record in steps_one.items():
        assert (record["samples"], record["index_sum"]) == (steps_two[step]["samples"],
                                                            steps_two[step]["index_sum"])
        assert abs(record["loss"] - steps_two[step]["loss"]) < 1e-5
        assert record["lr"] == steps_two[step]["lr"]
    # and the check is sharp: the 2-rank run's earlier steps read other samples
    assert steps_two[3]["index_sum"] != steps_one[4]["index_sum"]


def test_fsdp_run_with_accumulation_resumes_exactly(data: Path, tmp_path: Path) -> None:
    """FSDP2 with accumulated micro-batches (gradient sync held back, cached features through
    the sharded model) and a val loss on rank 0: checkpoint at step 2, drop step 4's, resume
    on 2 ranks, and the run repeats itself."""
    run = tmp_path / "run"
    command = [*TORCHRUN, "train", "--train-data", str(data), "--output-dir", str(run),
               "--val-data", str(data.with_name("val.csv")), "--strategy", "fsdp",
               "--batch-size", "4", "--grad-accum", "2", "--max-steps", "4",
               "--checkpoint-every", "2", "--keep", "0", "--lr", "1e-3", "--num-workers", "0",
               "--no-progress"]
    whole = _run(command)
    losses = [(r["step"], r["loss"]) for r in _log(run) if "loss" in r]
    val = [r["eval"]["val_loss"] for r in _log(run) if "eval" in r]
    assert whole["step"] == 4 and len(val) == 1 and val[0] > 0
    for leftover in (run / "checkpoint-0000004", run / "checkpoint-latest"):
        subprocess.run(["rm", "-rf", str(leftover)], check=True)
    _run([*command, "--resume", "latest"])
    assert [(r["step"], r["loss"]) for r in _log(run) if "loss" in r] == losses


# ---------------------------------------------------------------------------------------------
# FSDP shard units (the model contract's shard_units)


def _units(preset: str, **changes) -> list[torch.nn.Module]:
    import dataclasses

    from vlp.config import get_preset
    from vlp.models import build_model

    return build_model(dataclasses.replace(get_preset(preset), **changes)).shard_units()


@pytest.mark.parametrize("preset,changes", [
    ("clip-tiny", {}), ("coca-tiny", {}), ("simvlm-tiny", {}), ("blip2-tiny", {}),
    ("blip-tiny", {}), ("blip-tiny", {"share": "all"}), ("blip-tiny", {"share": "none"}),
], ids=lambda v: str(v) if not isinstance(v, dict) else "-".join(map(str, v.values())))
def test_shard_units_never_share_a_parameter(preset: str, changes: dict) -> None:
    """FSDP can shard a parameter once: two units that are not nested hold no common one."""
    units = _units(preset, **changes)
    assert units
    params = [set(map(id, unit.parameters())) for unit in units]
    inside = [set(map(id, unit.modules())) for unit in units]
    for i, j in itertools.combinations(range(len(units)), 2):
        nested = id(units[i]) in inside[j] or id(units[j]) in inside[i]
        assert nested or not params[i] & params[j], (preset, changes, i, j)


def test_bert_layers_and_qformer_layers_are_shard_units_where_they_can_be() -> None:
    from vlp.nn.bert import PostNormBlock
    from vlp.nn.qformer import QFormerLayer

    def count(units, cls):
        return sum(isinstance(unit, cls) for unit in units)

    assert count(_units("blip2-tiny"), QFormerLayer) > 0
    assert count(_units("blip-tiny", share="none"), PostNormBlock) > 0
    # encoder and decoder share cross-attention and FFNs: their layers stay in the root unit
    assert count(_units("blip-tiny"), PostNormBlock) == 0


def test_fsdp_trains_blip2_stage1_with_qformer_layers_sharded(data: Path, tmp_path: Path) -> None:
    from vlp.config import get_preset
    from vlp.models import build_model
    from vlp.tokenizers import train_tokenizer

    captions = [line.split(",", 1)[1] for line in data.read_text().splitlines()[1:]]
    tokenizer = train_tokenizer(captions, vocab_size=1024, context_length=32)
    config = get_preset("blip2-tiny")
    config.vision.layers = 2
    torch.manual_seed(0)
    vlp.save(build_model(config), tmp_path / "stage1", tokenizer=tokenizer)
    run = tmp_path / "run"
    result = _run([*TORCHRUN, "train", "--model", str(tmp_path / "stage1"), "--train-data",
                   str(data), "--output-dir", str(run), "--strategy", "fsdp",
                   "--batch-size", "8", "--max-steps", "2", "--lr", "1e-4", "--num-workers",
                   "0", "--no-progress"])
    assert result["step"] == 2
    losses = [r["loss"] for r in _log(run) if "loss" in r]
    assert len(losses) == 2 and all(math.isfinite(loss) for loss in losses)
    assert vlp.load(run).config.family == "blip2"


# ---------------------------------------------------------------------------------------------
# SLURM: rank and world from its environment when not under torchrun


def test_slurm_environment_gives_rank_world_and_rendezvous() -> None:
    env = {"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1",
           "SLURM_JOB_NODELIST": "gpu-[007-010,012],cpu3", "SLURM_JOB_ID": "4242"}
    assert slurm_launch_env(env) == {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1",
                                     "MASTER_ADDR": "gpu-007", "MASTER_PORT": "24242"}
    # set variables win; torchrun's WORLD_SIZE means SLURM is not asked; one task is no group
    assert slurm_launch_env({**env, "MASTER_PORT": "1234", "MASTER_ADDR": "h"}) == {
        "RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1"}
    assert slurm_launch_env({**env, "WORLD_SIZE": "2"}) == {}
    assert slurm_launch_env({**env, "SLURM_NTASKS": "1"}) == {}
    assert slurm_launch_env({}) == {}
    assert first_slurm_host("node17") == "node17"
    assert first_slurm_host("r[2-3]-n[04,01]") == "r2-n04"
    with pytest.raises(ConfigError, match="SLURM_PROCID=8 with SLURM_NTASKS=8"):
        slurm_launch_env({**env, "SLURM_PROCID": "8"})
    with pytest.raises(ConfigError, match="SLURM_JOB_NODELIST"):
        slurm_launch_env({"SLURM_PROCID": "0", "SLURM_NTASKS": "2"})


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_slurm_tasks_step_equals_one_process(data: Path, single_step: Path,
                                                 tmp_path: Path) -> None:
    """Two processes started the way srun starts them (SLURM variables only, no torchrun)
    form one gloo group: same samples, loss and gradient as one process on the whole batch."""
    out = tmp_path / "run"
    command = [*VLP, "train", "--train-data", str(data), "--output-dir", str(out),
               "--batch-size", "8", *ONE_STEP]
    base = {key: value for key, value in ENV.items()
            if key not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    base.update({"SLURM_NTASKS": "2", "SLURM_JOB_NODELIST": "127.0.0.1",
                 "MASTER_PORT": str(_free_port())})
    tasks = [subprocess.Popen(command, env={**base, "SLURM_PROCID": str(rank),
                                            "SLURM_LOCALID": str(rank)},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for rank in range(2)]
    outputs = [task.communicate(timeout=300) for task in tasks]
    for task, (_, err) in zip(tasks, outputs):
        assert task.returncode == 0, err[-4000:]
    assert json.loads(outputs[0][0].strip().splitlines()[-1])["step"] == 1
    assert outputs[1][0].strip() == ""  # one answer, from rank 0
    two, one = _log(out)[0], _log(single_step)[0]
    assert (two["samples"], two["index_sum"]) == (one["samples"], one["index_sum"])
    assert abs(two["loss"] - one["loss"]) < 1e-6
    assert abs(two["grad_norm"] - one["grad_norm"]) < 1e-5
