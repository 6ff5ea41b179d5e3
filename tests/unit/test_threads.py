"""Concurrent and nested runs on one model each see only their own interventions."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import torch
from torch import nn

import purelens as pl
from tests.helpers import hooks_on, tiny_gpt2


def test_eight_threads_twenty_runs_each_see_only_their_own() -> None:
    model = tiny_gpt2(n_layer=2)
    x = torch.randint(0, 97, (2, 5), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = {
            k: pl.run(model, x, [pl.add("h.0", float(k)), pl.save("h.1")])["h.1"] for k in range(8)
        }
        plain = pl.run(model, x, [pl.save("h.1")])["h.1"]

    def worker(k: int) -> list[bool]:
        results = []
        with torch.no_grad():
            for i in range(20):
                if i % 3 == 2:  # sprinkle runs with skips and a stop on the same model
                    rec = pl.run(model, x, [pl.skip("h.0"), pl.save("h.1"), pl.stop("h.1")])
                    results.append(rec.output is None and rec["h.1"].shape == plain.shape)
                    continue
                rec = pl.run(model, x, [pl.add("h.0", float(k)), pl.save("h.1")])
                results.append(torch.equal(rec["h.1"], expected[k]))
        return results

    with ThreadPoolExecutor(max_workers=8) as pool:
        outcomes = list(pool.map(worker, range(8)))
    assert all(all(r) for r in outcomes), outcomes
    assert hooks_on(model) == 0
    assert torch.equal(pl.run(model, x, [pl.save("h.1")])["h.1"], plain)


def test_a_run_inside_an_intervention_function(mlp) -> None:  # type: ignore[no-untyped-def]
    x = torch.randn(2, 4)
    inner = {}

    def patch_with_inner_run(v: torch.Tensor) -> torch.Tensor:
        rec = pl.run(mlp, x * 2, [pl.save("0")])  # the same model, a different pass
        inner["rec"] = rec
        return rec["0"]

    rec = pl.run(mlp, x, [pl.patch("0", patch_with_inner_run), pl.save("0")])
    assert torch.equal(inner["rec"]["0"], mlp.layers[0](x * 2))
    assert torch.equal(rec["0"], mlp.layers[0](x * 2))
    assert torch.allclose(inner["rec"].output, mlp(x * 2))  # the outer patch did not leak in
    assert hooks_on(mlp) == 0


def _run_beside(model: torch.nn.Module, x: torch.Tensor, survey: Callable[[], object]) -> list[str]:
    """Plain runs in one thread while `survey` repeats in another, for about a second.

    Returns what went wrong with the runs (nothing, when the survey leaves the model alone).
    """
    with torch.no_grad():
        expected = pl.run(model, x, [pl.save("h.1")])
    stop = threading.Event()
    problems: list[str] = []

    def surveys() -> None:
        while not stop.is_set():
            survey()

    def runs() -> None:
        deadline = time.monotonic() + 1.0
        with torch.no_grad():
            while time.monotonic() < deadline:
                try:
                    rec = pl.run(model, x, [pl.save("h.1")])
                except Exception as e:  # a crash is as wrong as a wrong value
                    problems.append(f"{type(e).__name__}: {e}")
                    continue
                if type(rec["h.1"]) is not torch.Tensor:
                    problems.append(f"a {type(rec['h.1']).__name__} in the record")
                elif not torch.equal(rec["h.1"], expected["h.1"]):
                    problems.append("a wrong value")

    surveyor = threading.Thread(target=surveys)
    surveyor.start()
    try:
        runs()
    finally:
        stop.set()
        surveyor.join()
    return problems


def test_shapes_validate_and_sweep_estimates_leave_other_threads_alone() -> None:
    # Issue 13, item 2: fake passes swapped the model's parameters for fake tensors,
    # so runs in other threads returned FakeTensors or crashed.
    model = tiny_gpt2(n_layer=2)
    x = torch.randint(0, 97, (2, 5), generator=torch.Generator().manual_seed(0))
    surveys = {
        "shapes": lambda: pl.shapes(model, x),
        "validate": lambda: pl.run(model, x, [pl.save("h.0")], validate=True),
        "sweep": lambda: pl.sweep(  # a new input shape each time: a new memory estimate
            model, x[:, : int(torch.randint(2, 6, ()))], [pl.add("h.0", 1.0), pl.add("h.0", 2.0)]
        ),
    }
    for name, survey in surveys.items():
        problems = _run_beside(model, x, survey)
        assert not problems, (name, problems[:3], len(problems))
    assert hooks_on(model) == 0


def test_params_are_seen_by_their_own_run_only() -> None:
    # Issue 13, item 2 (params=): functional_call swapped the tensors into the shared
    # modules, where runs and plain calls in other threads saw them.
    model = tiny_gpt2(n_layer=2)
    x = torch.randint(0, 97, (2, 5), generator=torch.Generator().manual_seed(0))
    zeros = {n: torch.zeros_like(p) for n, p in model.named_parameters() if "h.0" in n}
    with torch.no_grad():
        replaced = pl.run(model, x, [pl.save("h.1")], params=zeros)["h.1"]
    assert not torch.equal(replaced, pl.run(model, x, [pl.save("h.1")])["h.1"])

    def with_params() -> None:
        with torch.no_grad():
            assert torch.equal(pl.run(model, x, [pl.save("h.1")], params=zeros)["h.1"], replaced)

    problems = _run_beside(model, x, with_params)
    assert not problems, (problems[:3], len(problems))
    assert all(type(m.__dict__["_parameters"]) is dict for m in model.modules())


class Rotary(nn.Module):
    """Grows a cached table (a buffer it registers again) when a longer sequence comes."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("table", torch.cos(torch.arange(8.0))[:, None], persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[1]
        if n > self.table.shape[0]:
            self.register_buffer(
                "table", torch.cos(torch.arange(float(n)))[:, None], persistent=False
            )
        return x * self.table[:n]


def test_a_fake_pass_caches_nothing_another_thread_can_see() -> None:
    model = nn.Sequential(nn.Linear(4, 4), Rotary(), nn.Linear(4, 4))
    short, long = torch.randn(2, 6, 4), torch.randn(2, 300, 4)
    with torch.no_grad():
        expected = model(short)
    stop = threading.Event()
    problems: list[str] = []

    def surveys() -> None:
        while not stop.is_set():
            pl.shapes(model, long)

    surveyor = threading.Thread(target=surveys)
    surveyor.start()
    try:
        deadline = time.monotonic() + 1.0
        with torch.no_grad():
            while time.monotonic() < deadline:
                out = pl.run(model, short).output
                if type(out) is not torch.Tensor or not torch.equal(out, expected):
                    problems.append(type(out).__name__)
    finally:
        stop.set()
        surveyor.join()
    assert not problems, problems[:3]
    assert model[1].table.shape == (8, 1)
