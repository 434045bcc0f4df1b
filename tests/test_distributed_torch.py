"""torchref.Trainer on a 2-rank gloo process group (localhost, CPU) against one process.

Two process groups are started per run of this module (each start costs seconds on a loaded
machine): one runs every exactness scenario and returns its results through files, the other
the fault scenario (a rank that raises). Every wait carries a timeout.
"""

from __future__ import annotations

import datetime
import os
import socket
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import torchref
from tfreg_core.distributed import digest, rank_share
from tfreg_core.windows import epoch_order
from tfreg_harness import tolerance

# float64: the accumulated R x k x b update vs one step on the concatenated window (and the
# 20-update trajectories), the design table's "accumulation" row: 1e-12 relative.
EXACT = tolerance("accumulation", "float64")
WORLD = 2
LR = 0.125
L2 = 2.0**-7  # float32-exact: the Keras-named L2 rounds its factor through float32
CLIP = 0.5  # binds on some updates: the global norm of the reduced gradient is clipped
# (k, b, N): N not divisible by R*k*b; each last window leaves rank 1 a zero-example
# micro-batch (19 = 2*8 + 3; 34 = 24 + 8 + 2; 23 = 20 + 3).
CASES = [(1, 4, 19), (3, 4, 34), (2, 5, 23)]
TRAJECTORY = {"b": 3, "updates": 20}
SPAWN_TIMEOUT_S = 120
GROUP_TIMEOUT = datetime.timedelta(seconds=15)

pytestmark = pytest.mark.usefixtures("single_torch_thread")


# -- models and data (built identically in every process) ------------------------------------


def mlp() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(3, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3)
    ).double()


def data(n: int, seed: int = 1) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, 3)), rng.integers(0, 3, size=n), rng.uniform(0.5, 2.0, size=n)


def trainer(model: torch.nn.Module, optimizer: str, k: int, **kwargs: Any) -> torchref.Trainer:
    params = model.parameters()
    opt = (
        torch.optim.SGD(params, lr=LR, momentum=0.9)
        if optimizer == "sgd"
        else torch.optim.Adam(params, lr=0.01)
    )
    return torchref.Trainer(model, "cross_entropy", opt, accumulation_steps=k, **kwargs)


def weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    module = getattr(model, "module", model)
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


# -- what each rank runs ----------------------------------------------------------------------


def _counting_hook(state, bucket):
    """A DDP comm hook: counts its calls in ``state`` (one per bucket all-reduce), then
    all-reduces as DDP's default. No annotations: DDP checks that ``bucket``'s is GradBucket or
    absent, and this module's annotations are strings."""
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

    state["calls"] += 1
    return default_hooks.allreduce_hook(None, bucket)


def _ddp(model: torch.nn.Module, calls: dict[str, int] | None = None) -> torch.nn.Module:
    wrapped = torch.nn.parallel.DistributedDataParallel(model)
    if calls is not None:
        wrapped.register_comm_hook(calls, _counting_hook)
    return wrapped


def _scenarios(rank: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, b, n in CASES:  # against one step per concatenated window
        x, y, sw = data(n)
        for wrap in ("ddp", "plain"):
            calls = {"calls": 0}
            model = _ddp(mlp(), calls) if wrap == "ddp" else mlp()
            t = torchref.Trainer(
                model,
                "cross_entropy",
                torch.optim.SGD(model.parameters(), lr=LR),
                accumulation_steps=k,
                regularizer=torchref.L2(L2),
                global_clipnorm=CLIP,
            )
            history = t.fit(x, y, batch_size=b, epochs=1, sample_weight=sw, verbose=0)
            out[f"exact-{wrap}-{k}-{b}"] = {
                "weights": weights(model),
                "records": history.records,
                "hook_calls": calls["calls"],
            }
    b, updates = TRAJECTORY["b"], TRAJECTORY["updates"]
    x, y, sw = data(updates * 2 * WORLD * b, seed=2)
    for optimizer in ("sgd", "adam"):  # 2 ranks x 2 micro-batches
        model = _ddp(mlp())
        trainer(model, optimizer, 2).fit(x, y, batch_size=b, sample_weight=sw, verbose=0)
        out[f"trajectory-{optimizer}"] = weights(model)
    x, y, sw = data(24, seed=3)
    x[13] = np.nan  # no shuffle, k=2, b=3: window 1 holds examples 12..23.
    # Rank shares of window 1's first micro-batch (12..17): rank 0 12..14, rank 1 15..17; the
    # NaN at 13 is on rank 0 only; rank 1 sees a finite gradient and must skip all the same.
    model = _ddp(mlp())
    history = trainer(model, "sgd", 2).fit(x, y, batch_size=3, shuffle=False, verbose=0)
    out["nan"] = {"weights": weights(model), "skipped": [r["skipped"] for r in history.records]}
    x, y, sw = data(34, seed=4)  # checkpoint mid-window (k=3), resumed on a fresh trainer

    class Stop:
        def on_micro_batch_end(self, t: Any, epoch: int, micro_batch: int) -> None:
            if epoch == 1 and micro_batch == 1:
                t.stop_training = True

    model = _ddp(mlp())
    straight = trainer(model, "adam", 3)
    history = straight.fit(x, y, batch_size=4, epochs=2, sample_weight=sw, verbose=0)
    out["resume-straight"] = weights(model)
    out["resume-straight-history"] = {"records": history.records, "epochs": history.epochs}
    model = _ddp(mlp())
    t = trainer(model, "adam", 3)
    t.fit(x, y, batch_size=4, epochs=2, sample_weight=sw, verbose=0, callbacks=[Stop()])
    state = t.state_dict()
    fresh = _ddp(mlp())
    t2 = trainer(fresh, "adam", 3)
    t2.load_state_dict(state)
    history = t2.fit(x, y, batch_size=4, epochs=2, sample_weight=sw, verbose=0)
    out["resume-resumed"] = weights(fresh)
    out["resume-resumed-history"] = {"records": history.records, "epochs": history.epochs}
    x, y, sw = data(IGNORED["n"], seed=7)
    y[IGNORED["ignored"]] = -100  # nn.CrossEntropyLoss's ignore_index: the mask of a torch loss
    model = _ddp(mlp())
    t = torchref.Trainer(
        model, "cross_entropy", torch.optim.SGD(model.parameters(), lr=LR), accumulation_steps=2
    )
    history = t.fit(x, y, batch_size=IGNORED["b"], sample_weight=sw, shuffle=False, verbose=0)
    out["ignored"] = {
        "weights": weights(model),
        "elements": [r["elements"] for r in history.records],
    }
    out["loader"] = _loader_scenarios(rank)
    out["refused"] = []  # refusals raised on every rank before any update
    for case in ("params", "batch", "values"):
        model = mlp()
        if case == "params":
            with torch.no_grad():
                model[0].bias[0] += rank  # rank 1's weights differ from rank 0's
        # "values": each rank its own shard as arrays (equal sizes): each would train on its
        # share of its own shard only, half of every shard never seen, silently.
        x, y, _ = data(16, seed=1 + rank * (case == "values"))
        try:
            trainer(model, "sgd", 1).fit(x, y, batch_size=4 + rank * (case == "batch"), verbose=0)
        except ValueError as error:
            out["refused"].append(str(error))
    return out


# Masked (ignore_index) case: k=2, b=3 per rank, no shuffle, 25 = 12 + 12 + 1 examples. Rank 1's
# whole share of the first micro-batch (3..5) is ignored, and 9 and 20.
IGNORED = {"b": 3, "n": 25, "ignored": [3, 4, 5, 9, 20]}
LOADER = {"k": 2, "b": 3, "n": 26}  # 13 examples per rank, no padding: 5 micro-batches each


def _loader(n: int, **sampler: Any) -> torch.utils.data.DataLoader:
    x, y, sw = data(n, seed=5)
    dataset = torch.utils.data.TensorDataset(*(torch.as_tensor(v) for v in (x, y, sw)))
    shard = torch.utils.data.DistributedSampler(dataset, shuffle=False, **sampler)
    return torch.utils.data.DataLoader(dataset, batch_size=LOADER["b"], sampler=shard)


def _loader_scenarios(rank: int) -> dict[str, Any]:
    """Each rank its own DistributedSampler shard. Unshuffled, rank r holds examples r, r+2, ...,
    so micro-batch j of both ranks together is examples [6j, 6j+6): the one-process plan of
    global micro-batches of 6."""
    out: dict[str, Any] = {}
    model = _ddp(mlp())
    history = trainer(model, "sgd", LOADER["k"]).fit(_loader(LOADER["n"]), verbose=0)
    out["weights"], out["records"] = weights(model), history.records
    refused = []
    # 25 examples on 2 ranks: the sampler repeats one; then shards of different lengths (a
    # list of micro-batches: its length is known); then the whole dataset on every rank.
    uneven = list(
        torch.utils.data.DataLoader(
            torch.utils.data.TensorDataset(*(torch.as_tensor(v) for v in data(12 + 3 * rank)[:2])),
            batch_size=3,
        )
    )
    whole = torch.utils.data.DataLoader(_loader(LOADER["n"]).dataset, batch_size=LOADER["b"])
    # Each rank's own dataset (half of the data) with the default sampler: exact, as the
    # DistributedSampler shards (rank r holds examples r, r+2, ...).
    own = _loader(LOADER["n"]).dataset
    subset = torch.utils.data.Subset(own, list(range(rank, LOADER["n"], WORLD)))
    model = _ddp(mlp())
    trainer(model, "sgd", LOADER["k"]).fit(
        torch.utils.data.DataLoader(subset, batch_size=LOADER["b"]), verbose=0
    )
    out["subset_weights"] = weights(model)
    # The padding sampler inside a BatchSampler (the loader's own sampler is then a default one).
    padded = _loader(LOADER["n"] - 1)
    batched = torch.utils.data.DataLoader(
        padded.dataset,
        batch_sampler=torch.utils.data.BatchSampler(padded.sampler, LOADER["b"], drop_last=False),
    )
    for loader in (padded, uneven, batched, whole):
        model = mlp()
        before = weights(model)
        try:
            trainer(model, "sgd", 2).fit(loader, verbose=0)
        except ValueError as error:
            unchanged = all(torch.equal(v, before[k]) for k, v in weights(model).items())
            refused.append({"error": str(error), "unchanged": unchanged})
    out["refused"] = refused
    # A shuffling DistributedSampler over 3 epochs: the order each rank trains on, per epoch.
    probe = _Probe()
    shuffled = torch.utils.data.DistributedSampler(_INDICES, shuffle=True, seed=3)
    loader = torch.utils.data.DataLoader(_INDICES, batch_size=LOADER["b"], sampler=shuffled)
    trainer(probe, "sgd", LOADER["k"]).fit(loader, epochs=3, verbose=0)
    out["shuffled"] = probe.seen
    return out


# Examples whose feature is their index: _Probe records which ones a rank trains on, in order.
_INDICES = torch.utils.data.TensorDataset(
    torch.arange(LOADER["n"], dtype=torch.float64)[:, None].expand(-1, 3).contiguous(),
    torch.arange(LOADER["n"]) % 3,
)


class _Probe(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inner, self.seen = mlp(), []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.extend(int(v) for v in x[:, 0])
        return self.inner(x)


class _Raises(torch.nn.Module):
    """Raises on its third forward on rank 1 (a user's bug on one rank)."""

    def __init__(self, rank: int) -> None:
        super().__init__()
        self.inner, self.rank, self.calls = mlp(), rank, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.rank == 1 and self.calls == 3:
            raise ValueError("rank 1 fails on purpose")
        return self.inner(x)


def _fault(rank: int) -> dict[str, Any]:
    x, y, _ = data(40)
    model = _ddp(_Raises(rank))
    trainer(model, "sgd", 2).fit(x, y, batch_size=4, epochs=1, verbose=0)
    return {}


def _worker(rank: int, port: int, scenario: str, outdir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=GROUP_TIMEOUT)
    started = time.monotonic()
    try:
        result: dict[str, Any] = {
            "value": {"scenarios": _scenarios, "fault": _fault}[scenario](rank)
        }
    except Exception as error:  # reported to the parent, which asserts on it
        result = {"error": f"{type(error).__name__}: {error}", "trace": traceback.format_exc()}
    result["elapsed"] = time.monotonic() - started
    torch.save(result, Path(outdir) / f"rank{rank}.pt")
    if "error" not in result:
        torch.distributed.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(scenario: str) -> list[dict[str, Any]]:
    """Start WORLD processes on localhost, wait at most SPAWN_TIMEOUT_S, return their results."""
    ctx = torch.multiprocessing.get_context("spawn")
    with tempfile.TemporaryDirectory() as outdir:
        port = _free_port()
        procs = [
            ctx.Process(target=_worker, args=(r, port, scenario, outdir)) for r in range(WORLD)
        ]
        for p in procs:
            p.start()
        deadline = time.monotonic() + SPAWN_TIMEOUT_S
        for p in procs:
            p.join(max(deadline - time.monotonic(), 0))
        hung = [p for p in procs if p.is_alive()]
        for p in hung:
            p.kill()
            p.join()
        assert not hung, f"{len(hung)} rank(s) still running after {SPAWN_TIMEOUT_S} s"
        files = [Path(outdir) / f"rank{r}.pt" for r in range(WORLD)]
        missing = [str(f) for f in files if not f.exists()]
        assert not missing, f"ranks wrote no result: {missing}"
        return [torch.load(f, weights_only=False) for f in files]


@pytest.fixture(scope="module")
def ranks() -> list[dict[str, Any]]:
    results = run_ranks("scenarios")
    for r, result in enumerate(results):
        assert "error" not in result, f"rank {r}: {result.get('trace')}"
    return [result["value"] for result in results]


# -- one-process references -------------------------------------------------------------------


def reference_epoch(k: int, b: int, n: int) -> dict[str, torch.Tensor]:
    """One SGD step per concatenated window of R*k*b consecutive examples of the epoch's order:
    sum(w*l)/N + L2, Keras' global-norm clipping, written out with plain torch."""
    x, y, sw = data(n)
    order = epoch_order(n, shuffle=True, seed=0, epoch=0)
    model = mlp()
    params = list(model.parameters())
    for start in range(0, n, WORLD * k * b):
        idx = order[start : start + WORLD * k * b]
        values = torch.nn.functional.cross_entropy(
            model(torch.tensor(x[idx])), torch.tensor(y[idx]), reduction="none"
        )
        loss = (values * torch.tensor(sw[idx])).sum() / len(idx)
        loss = loss + sum(L2 * (p**2).sum() for p in params if p.ndim >= 2)
        grads = torch.autograd.grad(loss, params)
        norm = torch.sqrt(sum((g**2).sum() for g in grads))
        with torch.no_grad():
            for p, g in zip(params, grads, strict=True):
                p -= LR * g * CLIP / torch.clamp(norm, min=CLIP)
    return weights(model)


def reference_ignored() -> tuple[dict[str, torch.Tensor], list[float]]:
    """One SGD step per window of 12 consecutive examples: sum(w*l) over the targets that are
    not ignored / their count (0 when none counts), in plain torch; and the counts."""
    x, y, sw = data(IGNORED["n"], seed=7)
    y[IGNORED["ignored"]] = -100
    model = mlp()
    params = list(model.parameters())
    counts = []
    for start in range(0, IGNORED["n"], WORLD * 2 * IGNORED["b"]):
        idx = slice(start, start + WORLD * 2 * IGNORED["b"])
        target = torch.tensor(y[idx])
        values = torch.nn.functional.cross_entropy(
            model(torch.tensor(x[idx])), target, reduction="none", ignore_index=-100
        )
        count = int((target != -100).sum())
        counts.append(float(count))
        loss = (values * torch.tensor(sw[idx])).sum() / max(count, 1)
        grads = torch.autograd.grad(loss, params)
        with torch.no_grad():
            for p, g in zip(params, grads, strict=True):
                p -= LR * g
    return weights(model), counts


def assert_weights_close(actual: dict, expected: dict, rtol: float) -> None:
    for name, value in expected.items():
        scale = value.abs().max().item()
        diff = (actual[name] - value).abs().max().item()
        assert diff <= rtol * scale, f"{name}: max abs diff {diff:.3e} > {rtol} * {scale:.3e}"


# -- tests ------------------------------------------------------------------------------------


def test_rank_shares_partition_each_global_micro_batch() -> None:
    # Hand-computed: 7 examples, b=4: rank 0 takes 4, rank 1 the other 3; 3 examples: 3 and 0.
    assert [rank_share(7, rank=r, world_size=2, batch_size=4) for r in (0, 1)] == [(0, 4), (4, 7)]
    assert [rank_share(3, rank=r, world_size=2, batch_size=4) for r in (0, 1)] == [(0, 3), (3, 3)]
    with pytest.raises(ValueError, match="size"):
        rank_share(9, rank=0, world_size=2, batch_size=4)
    with pytest.raises(ValueError, match="rank"):
        rank_share(4, rank=2, world_size=2, batch_size=4)


def test_digest_compares_values_not_buffers() -> None:
    # Equal strings in two separate object arrays (pointer buffers differ) digest alike; one
    # ulp, another dtype or another shape of the same bytes does not.
    words = np.array([b"ab", b"c"], dtype=object)
    assert digest([words]) == digest([np.array([b"a" + b"b", b"c"], dtype=object)])
    assert digest([words]) != digest([np.array([b"a", b"bc"], dtype=object)])
    values = np.array([0.5, 1.0])
    assert digest([values]) != digest([np.array([0.5, np.nextafter(1.0, 2.0)])])
    assert digest([values]) != digest([values.view(np.int64)])
    assert digest([values]) != digest([values.reshape(2, 1)])


@pytest.mark.parametrize("wrap", ["ddp", "plain"])
@pytest.mark.parametrize(("k", "b", "n"), CASES, ids=[f"R2-k{k}-b{b}-N{n}" for k, b, n in CASES])
def test_two_ranks_equal_one_step_per_concatenated_window(ranks, wrap, k, b, n) -> None:
    expected = reference_epoch(k, b, n)
    results = [r[f"exact-{wrap}-{k}-{b}"] for r in ranks]
    for result in results:
        assert_weights_close(result["weights"], expected, EXACT.rtol)
    # Bit-identical across ranks, and the same (global) History on both.
    for name, value in results[0]["weights"].items():
        assert torch.equal(value, results[1]["weights"][name]), name
    assert results[0]["records"] == results[1]["records"]
    windows = -(-n // (WORLD * k * b))
    assert [r["examples"] for r in results[0]["records"]] == [WORLD * k * b] * (windows - 1) + [
        n - (windows - 1) * WORLD * k * b
    ]
    assert [r["elements"] for r in results[0]["records"]][-1] == n % (WORLD * k * b)


@pytest.mark.parametrize(("k", "b", "n"), CASES, ids=[f"k{k}" for k, _, _ in CASES])
def test_one_gradient_all_reduce_per_update_under_ddp(ranks, k, b, n) -> None:
    updates = -(-n // (WORLD * k * b))
    # A model this small fits one DDP bucket: one comm-hook call is one gradient all-reduce.
    assert [r[f"exact-ddp-{k}-{b}"]["hook_calls"] for r in ranks] == [updates, updates]
    assert [r[f"exact-plain-{k}-{b}"]["hook_calls"] for r in ranks] == [0, 0]


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_trajectory_one_rank_by_four_equals_two_ranks_by_two(ranks, optimizer) -> None:
    b, updates = TRAJECTORY["b"], TRAJECTORY["updates"]
    x, y, sw = data(updates * 2 * WORLD * b, seed=2)
    model = mlp()
    history = trainer(model, optimizer, 4).fit(x, y, batch_size=b, sample_weight=sw, verbose=0)
    assert len(history) == updates
    for r in ranks:
        assert_weights_close(r[f"trajectory-{optimizer}"], weights(model), EXACT.rtol)


def test_nonfinite_micro_batch_on_one_rank_skips_everywhere(ranks) -> None:
    assert [r["nan"]["skipped"] for r in ranks] == [[False, True], [False, True]]
    for name, value in ranks[0]["nan"]["weights"].items():
        assert torch.equal(value, ranks[1]["nan"]["weights"][name]), name
        assert torch.isfinite(value).all(), name


def test_checkpoint_mid_window_resumes_bitwise(ranks) -> None:
    for r in ranks:
        for name, value in r["resume-straight"].items():
            assert torch.equal(value, r["resume-resumed"][name]), name


def test_checkpoint_mid_window_resumes_the_window_records(ranks) -> None:
    # The resumed window's record counts the examples added before the checkpoint too (the
    # all-reduced `examples` statistic is part of the state), and so the epoch's loss, which
    # weights each update's by its examples, is the uninterrupted run's: bitwise, the same
    # window sums reduced in the same order. 34 examples, 2 ranks x 4, k=3: windows of 24, 10.
    for r in ranks:
        straight, resumed = r["resume-straight-history"], r["resume-resumed-history"]
        assert [rec["examples"] for rec in resumed["records"]] == [24, 10]
        assert resumed["records"] == straight["records"][-2:]
        assert resumed["epochs"][-1] == straight["epochs"][-1]


def test_ignored_targets_divide_by_the_global_count(ranks) -> None:
    expected, counts = reference_ignored()
    assert counts == [8.0, 11.0, 1.0]  # hand count: 12 - 4 ignored, 12 - 1, 1
    for r in ranks:
        assert_weights_close(r["ignored"]["weights"], expected, EXACT.rtol)
        assert r["ignored"]["elements"] == counts


def test_distributed_sampler_shards_equal_one_step_per_window(ranks) -> None:
    k, b, n = LOADER["k"], LOADER["b"], LOADER["n"]
    x, y, sw = data(n, seed=5)
    model = mlp()  # one process, the same examples in global micro-batches of WORLD * b
    history = trainer(model, "sgd", k).fit(
        x, y, batch_size=WORLD * b, shuffle=False, sample_weight=sw, verbose=0
    )
    for r in ranks:
        assert_weights_close(r["loader"]["weights"], weights(model), EXACT.rtol)
        assert_weights_close(r["loader"]["subset_weights"], weights(model), EXACT.rtol)
        assert [rec["examples"] for rec in r["loader"]["records"]] == [12, 12, 2]
        assert [rec["loss"] for rec in r["loader"]["records"]] == pytest.approx(
            [rec["loss"] for rec in history.records], rel=EXACT.rtol
        )


def test_distributed_sampler_reshuffles_every_epoch(ranks) -> None:
    # torch's own sampler, stepped as a torch loop steps it (set_epoch before each epoch):
    # each epoch its own permutation (without set_epoch all three were epoch 0's).
    per_epoch = LOADER["n"] // WORLD
    for rank, r in enumerate(ranks):
        sampler = torch.utils.data.DistributedSampler(
            _INDICES, num_replicas=WORLD, rank=rank, shuffle=True, seed=3
        )
        expected = []
        for epoch in range(3):
            sampler.set_epoch(epoch)
            expected.extend(sampler)
        assert r["loader"]["shuffled"] == expected
        epochs = [expected[e * per_epoch : (e + 1) * per_epoch] for e in range(3)]
        assert epochs[0] != epochs[1] != epochs[2]


@pytest.mark.parametrize(
    ("case", "message"),
    [
        (0, "DistributedSampler pads the dataset by repeating 1 example"),
        (1, "same number of"),
        (2, "DistributedSampler pads the dataset by repeating 1 example"),
        (3, "Every rank would iterate the whole dataset"),
    ],
    ids=[
        "padding-sampler",
        "uneven-shards",
        "padding-sampler-in-batch-sampler",
        "whole-dataset-on-every-rank",
    ],
)
def test_shards_that_would_miscount_refused_on_every_rank(ranks, case, message) -> None:
    for r in ranks:
        refused = r["loader"]["refused"][case]
        assert message in refused["error"]
        assert refused["unchanged"]


def test_differing_parameters_or_batch_size_refused_on_every_rank(ranks) -> None:
    for r in ranks:
        params, batch, values = r["refused"]
        assert "parameters differ across ranks" in params
        assert "Every rank must call fit with the same arrays" in batch
        assert "Every rank must call fit with the same arrays" in values


def test_rank_that_raises_fails_the_other_within_bounded_time() -> None:
    started = time.monotonic()
    results = run_ranks("fault")
    assert "ValueError: rank 1 fails on purpose" in results[1]["error"]
    assert "error" in results[0], "rank 0 finished although rank 1 raised"
    assert results[0]["elapsed"] < GROUP_TIMEOUT.total_seconds() + 30, results[0]
    assert time.monotonic() - started < SPAWN_TIMEOUT_S
