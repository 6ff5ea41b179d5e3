"""purelens against hand-written hooks, nnsight and TransformerLens, side by side.

Every approach runs the same task on the same weights in one process; the
approaches of a task are interleaved in every repeat and the table shows
medians and the ratio to hand-written raw hooks (for batched sweeps, to the
hand-batched raw hooks). Before timing, each approach's result is checked
against the raw hooks' (allclose) and the check is printed with the table.

    pip install -e ".[benchmarks]"      # nnsight and transformer-lens
    python benchmarks/compare.py                      # GPT-2-small shape, about 6 minutes
    python benchmarks/compare.py --out benchmarks/RESULTS.md
    python benchmarks/compare.py --quick              # seconds: a smoke run

A peer library that is not installed gets "-" in its column.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import importlib.util
import os
import platform
import re
import statistics
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from _common import gpt2
from torch import Tensor, nn

import purelens as pl

COLUMNS = ["bare forward", "raw hooks", "purelens", "nnsight", "TransformerLens"]
HAVE_NNSIGHT = importlib.util.find_spec("nnsight") is not None
HAVE_TL = importlib.util.find_spec("transformer_lens") is not None


@dataclasses.dataclass
class Task:
    """One row: approaches by column, the column ratios are taken to, and the unit."""

    name: str
    approaches: dict[str, Callable[[], Any]]
    unit: str = "ms"
    base: str = "raw hooks"
    results: dict[str, Any] = dataclasses.field(default_factory=dict)
    medians: dict[str, float] = dataclasses.field(default_factory=dict)
    check: str = ""


@dataclasses.dataclass
class Setup:
    """The models (one GPT-2 per library that changes its model) and inputs."""

    model: nn.Module
    x: Tensor
    layers: int
    middle: int
    nn_model: Any = None
    bridge: Any = None
    lm: Any = None


def primary(output: Any) -> Tensor:
    return output[0] if isinstance(output, tuple) else output


def with_primary(output: Any, new: Tensor) -> Any:
    return (new, *output[1:]) if isinstance(output, tuple) else new


@torch.no_grad()
def hooked(model: nn.Module, hooks: dict[nn.Module, Callable[..., Any]], *args: Any) -> Any:
    """Call `model` with forward hooks registered for this call only."""
    handles = [m.register_forward_hook(fn) for m, fn in hooks.items()]
    try:
        return model(*args)
    finally:
        for h in handles:
            h.remove()


# Single runs -----------------------------------------------------------------


def single_runs(s: Setup) -> list[Task]:
    model, x, mid = s.model, s.x, s.middle
    blocks = model.transformer.h
    site = f"h.{mid}"
    every = [f"h.{i}" for i in range(s.layers)]

    def raw_save() -> Tensor:
        saved: list[Tensor] = []
        hooked(model, {blocks[mid]: lambda m, a, o: saved.append(primary(o))}, x)
        return saved[0]

    def raw_save_all() -> list[Tensor]:
        saved: dict[int, Tensor] = {}
        hooks = {
            b: (lambda m, a, o, i=i: saved.__setitem__(i, primary(o))) for i, b in enumerate(blocks)
        }
        hooked(model, hooks, x)
        return [saved[i] for i in range(s.layers)]

    def zero_position(m: nn.Module, a: Any, o: Any) -> Any:
        new = primary(o).clone()
        new[:, 5] = 0
        return with_primary(o, new)

    def raw_patch() -> Tensor:
        return hooked(model, {blocks[mid]: zero_position}, x).logits

    saves, all_saves = [pl.save(site)], [pl.save(s_) for s_ in every]
    patch = [pl.patch(site, pl.at(5, torch.zeros_like))]
    tasks = [
        Task(
            "save 1 block",
            {
                "bare forward": lambda: model(x),
                "raw hooks": raw_save,
                "purelens": lambda: pl.run(model, x, saves)[site],
            },
        ),
        Task(
            "save every block",
            {
                "raw hooks": raw_save_all,
                "purelens": lambda: list(pl.run(model, x, all_saves).values()),
            },
        ),
        Task(
            "patch 1 position",
            {"raw hooks": raw_patch, "purelens": lambda: pl.run(model, x, patch).output.logits},
        ),
    ]
    if s.nn_model is not None:
        nm = s.nn_model

        def nn_save() -> Tensor:
            with nm.trace(x):
                h = nm.transformer.h[mid].output.save()
            return primary(h)

        def nn_save_all() -> list[Tensor]:
            with nm.trace(x):
                hs = list().save()
                for i in range(s.layers):
                    hs.append(nm.transformer.h[i].output)
            return [primary(h) for h in hs]

        def nn_patch() -> Tensor:
            with nm.trace(x):
                nm.transformer.h[mid].output[:, 5] = 0
                logits = nm.lm_head.output.save()
            return logits

        tasks[0].approaches["nnsight"] = nn_save
        tasks[1].approaches["nnsight"] = nn_save_all
        tasks[2].approaches["nnsight"] = nn_patch
    if s.bridge is not None:
        br = s.bridge
        name = f"blocks.{mid}.hook_resid_post"
        names = [f"blocks.{i}.hook_resid_post" for i in range(s.layers)]

        def tl_save() -> Tensor:
            _, cache = br.run_with_cache(x, names_filter=name)
            return cache[name]

        def tl_save_all() -> list[Tensor]:
            _, cache = br.run_with_cache(x, names_filter=lambda n: n in names)
            return [cache[n] for n in names]

        def tl_zero(act: Tensor, hook: Any) -> Tensor:
            act[:, 5] = 0
            return act

        tasks[0].approaches["TransformerLens"] = tl_save
        tasks[1].approaches["TransformerLens"] = tl_save_all
        tasks[2].approaches["TransformerLens"] = lambda: br.run_with_hooks(
            x, fwd_hooks=[(name, tl_zero)]
        )
    return tasks


# Sweeps ----------------------------------------------------------------------


def patching_sweep(s: Setup, positions: int) -> list[Task]:
    model, layers = s.model, s.layers
    blocks = model.transformer.h
    g = torch.Generator().manual_seed(1)
    clean, corrupt = torch.randint(0, model.config.vocab_size, (2, 1, positions), generator=g)
    cells = [(l_, p) for l_ in range(layers) for p in range(positions)]
    clean_rec = pl.run(model, clean, [pl.save(f"h.{l_}") for l_ in range(layers)])
    clean_h = [clean_rec[f"h.{l_}"] for l_ in range(layers)]

    def raw_loop() -> Tensor:
        out = []
        for l_, p in cells:

            def put(m: nn.Module, a: Any, o: Any, l_: int = l_, p: int = p) -> Any:
                new = primary(o).clone()
                new[:, p] = clean_h[l_][:, p]
                return with_primary(o, new)

            out.append(hooked(model, {blocks[l_]: put}, corrupt).logits[:, -1])
        return torch.stack(out)

    def raw_batched() -> Tensor:
        rows = torch.arange(positions)

        def put(m: nn.Module, a: Any, o: Any, l_: int) -> Any:
            new = primary(o).clone()
            new[l_ * positions + rows, rows] = clean_h[l_][0, rows]
            return with_primary(o, new)

        hooks = {b: (lambda m, a, o, l_=l_: put(m, a, o, l_)) for l_, b in enumerate(blocks)}
        logits = hooked(model, hooks, corrupt.expand(len(cells), -1)).logits[:, -1]
        return logits[:, None]

    pl_cells = [pl.patch(f"h.{l_}", pl.at(p, lambda v, c=clean_h[l_][:, p]: c)) for l_, p in cells]

    def pl_loop() -> Tensor:
        return torch.stack([pl.run(model, corrupt, [c]).output.logits[:, -1] for c in pl_cells])

    def pl_sweep() -> Tensor:
        rec = pl.sweep(model, corrupt, pl_cells, output=lambda o: o.logits[:, -1], progress=False)
        return rec.output

    name = f"patching sweep {layers} x {positions} cells"
    loop = Task(f"{name}: loop", {"raw hooks": raw_loop, "purelens": pl_loop})
    batched = Task(f"{name}: batched", {"raw hooks": raw_batched, "purelens": pl_sweep})
    if s.nn_model is not None:
        nm = s.nn_model

        def nn_loop() -> Tensor:
            out = []
            for l_, p in cells:
                with nm.trace(corrupt):
                    nm.transformer.h[l_].output[:, p] = clean_h[l_][:, p]
                    logits = nm.lm_head.output[:, -1].save()
                out.append(logits)
            return torch.stack(out)

        loop.approaches["nnsight"] = nn_loop
    if s.bridge is not None:
        br = s.bridge

        def tl_loop() -> Tensor:
            out = []
            for l_, p in cells:

                def put(act: Tensor, hook: Any, l_: int = l_, p: int = p) -> Tensor:
                    act[:, p] = clean_h[l_][:, p]
                    return act

                hook = [(f"blocks.{l_}.hook_resid_post", put)]
                out.append(br.run_with_hooks(corrupt, fwd_hooks=hook)[:, -1])
            return torch.stack(out)

        loop.approaches["TransformerLens"] = tl_loop
    batched.base = "raw hooks"
    return [loop, batched]


def steering_sweep(s: Setup, n: int, tokens: int) -> tuple[list[Task], Task]:
    model, mid = s.model, s.middle
    block = model.transformer.h[mid]
    g = torch.Generator().manual_seed(2)
    x = torch.randint(0, model.config.vocab_size, (1, tokens), generator=g)
    vectors = torch.randn(n, model.config.n_embd, generator=g)

    def raw_loop() -> Tensor:
        out = []
        for v in vectors:
            add = lambda m, a, o, v=v: with_primary(o, primary(o) + v)  # noqa: E731
            out.append(hooked(model, {block: add}, x).logits[:, -1])
        return torch.stack(out)

    def raw_batched() -> Tensor:
        add = lambda m, a, o: with_primary(o, primary(o) + vectors[:, None])  # noqa: E731
        return hooked(model, {block: add}, x.expand(n, -1)).logits[:, -1][:, None]

    site = f"h.{mid}"
    cells = [pl.add(site, v) for v in vectors]

    def pl_loop() -> Tensor:
        return torch.stack([pl.run(model, x, [c]).output.logits[:, -1] for c in cells])

    def sweep(method: str, on: nn.Module = model) -> Callable[[], Tensor]:
        keep = lambda o: o.logits[:, -1]  # noqa: E731
        return lambda: pl.sweep(on, x, cells, output=keep, method=method, progress=False).output  # type: ignore[arg-type]

    name = f"{n} steering vectors, 1 x {tokens} tokens"
    loop = Task(f"{name}: loop", {"raw hooks": raw_loop, "purelens": pl_loop})
    batched = Task(f"{name}: batched", {"raw hooks": raw_batched, "purelens": sweep("auto")})
    if s.nn_model is not None:
        nm = s.nn_model

        def nn_loop() -> Tensor:
            out = []
            for v in vectors:
                with nm.trace(x):
                    nm.transformer.h[mid].output[:] += v
                    logits = nm.lm_head.output[:, -1].save()
                out.append(logits)
            return torch.stack(out)

        loop.approaches["nnsight"] = nn_loop
    if s.bridge is not None:
        br = s.bridge

        def tl_loop() -> Tensor:
            out = []
            for v in vectors:
                hook = [(f"blocks.{mid}.hook_resid_post", lambda act, hook, v=v: act + v)]
                out.append(br.run_with_hooks(x, fwd_hooks=hook)[:, -1])
            return torch.stack(out)

        loop.approaches["TransformerLens"] = tl_loop

    eager = copy.deepcopy(model)
    eager.config._attn_implementation = "eager"
    paths = Task(
        f"{name}: pl.sweep paths",
        {
            "auto (the default)": sweep("auto"),
            "fold (sdpa)": sweep("fold"),
            "vmap (sdpa)": sweep("vmap"),
            "fold (eager attention)": sweep("fold", eager),
            "vmap (eager attention)": sweep("vmap", eager),
        },
        base="fold (sdpa)",
    )
    return [loop, batched], paths


# Gradients and generation -------------------------------------------------------


def gradients(s: Setup) -> Task:
    model, x, layers = s.model, s.x, s.layers
    blocks = model.transformer.h

    def loss_of(logits: Tensor) -> Tensor:
        return logits[:, -1].log_softmax(-1)[:, 0].sum()

    def raw() -> list[Tensor]:
        acts: dict[int, Tensor] = {}
        handles = [
            b.register_forward_hook(lambda m, a, o, i=i: acts.__setitem__(i, primary(o)))
            for i, b in enumerate(blocks)
        ]
        try:
            loss = loss_of(model(x).logits)
        finally:
            for h in handles:
                h.remove()
        return list(torch.autograd.grad(loss, [acts[i] for i in range(layers)]))

    marks = [pl.save_grad(f"h.{i}") for i in range(layers)]

    def purelens() -> list[Tensor]:
        rec = pl.run(model, x, marks, loss=lambda out: loss_of(out.logits))
        return [rec.grads[f"h.{i}"] for i in range(layers)]

    task = Task(f"gradients at every block ({layers})", {"raw hooks": raw, "purelens": purelens})
    if s.nn_model is not None:
        nm = s.nn_model

        def nn_grads() -> list[Tensor]:
            with nm.trace(x):
                acts = [nm.transformer.h[i].output for i in range(layers)]
                loss = loss_of(nm.lm_head.output)
                grads = list().save()
                with loss.backward():
                    for i in reversed(range(layers)):
                        grads.append(acts[i].grad)
            return grads[::-1]

        task.approaches["nnsight"] = nn_grads
    if s.bridge is not None:
        br = s.bridge

        def tl_grads() -> list[Tensor]:
            grads: dict[int, Tensor] = {}
            hooks = [
                (f"blocks.{i}.hook_resid_post", lambda g, hook, i=i: grads.__setitem__(i, g))
                for i in range(layers)
            ]
            with br.hooks(bwd_hooks=hooks):
                loss_of(br(x)).backward()
            for p in br.parameters():  # TransformerLens users pay for parameter gradients too
                p.grad = None
            return [grads[i] for i in range(layers)]

        task.approaches["TransformerLens"] = tl_grads
    return task


def generation(s: Setup, new: int) -> Task:
    model, x, mid = s.model, s.x, s.middle
    block = model.transformer.h[mid]
    kw = {"max_new_tokens": new, "do_sample": False, "pad_token_id": 0}

    def bare() -> Tensor:
        return model.generate(x, **kw)

    def raw() -> tuple[Tensor, list[Tensor]]:
        saved: list[Tensor] = []
        handle = block.register_forward_hook(lambda m, a, o: saved.append(primary(o)))
        try:
            return model.generate(x, **kw), saved
        finally:
            handle.remove()

    ivs = [pl.save(f"h.{mid}")]

    def purelens() -> tuple[Tensor, list[Tensor]]:
        rec = pl.generate(model, x, ivs, **kw)
        return rec.output, list(rec[f"h.{mid}"])

    task = Task(
        f"generate {new} tokens, save every step",
        {"bare forward": bare, "raw hooks": raw, "purelens": purelens},
    )
    if s.lm is not None:
        lm = s.lm

        def nn_generate() -> tuple[Tensor, list[Tensor]]:
            mask = torch.ones_like(x)
            with lm.generate({"input_ids": x, "attention_mask": mask}, **kw) as tracer:
                saved = list().save()
                for _ in tracer.iter[:new]:
                    saved.append(primary(lm.transformer.h[mid].output))
                ids = tracer.result.save()
            return ids, list(saved)

        task.approaches["nnsight"] = nn_generate
    if s.bridge is not None:
        br = s.bridge

        def tl_generate() -> tuple[Tensor, list[Tensor]]:
            saved: list[Tensor] = []

            # TransformerLens 4.3 with transformers 5.2x never fills the bridge's KV cache
            # (GPT2Block passes `cache=`, the bridge reads `past_key_values`/`layer_past`), so
            # its cached decode steps attend to the new token alone (values off by ~0.05).
            # Run it uncached, keeping each step's new positions: the whole sequence is
            # recomputed every step, which is what a TransformerLens user gets right today.
            def keep(act: Tensor, hook: Any) -> None:
                saved.append(act if not saved else act[:, -1:])

            hook = [(f"blocks.{mid}.hook_resid_post", keep)]
            with br.hooks(fwd_hooks=hook):
                ids = br.generate(
                    x,
                    max_new_tokens=new,
                    do_sample=False,
                    stop_at_eos=False,
                    verbose=False,
                    use_past_kv_cache=False,
                )
            return ids, saved

        task.approaches["TransformerLens"] = tl_generate
    return task


def batching_profile(s: Setup, tokens: int, n: int) -> str:
    """Where the time of a loop of n passes and of one batched pass goes (torch.profiler)."""
    from torch.profiler import profile

    x = torch.randint(0, s.model.config.vocab_size, (1, tokens))
    lines = ["| pass | wall (ms) | in matrix products |", "|---|---:|---:|"]
    for label, inputs, times in (
        (f"loop: {n} passes of 1 x {tokens}", x, n),
        (f"batched: 1 pass of {n} x {tokens}", x.expand(n, -1), 1),
    ):
        with torch.no_grad():
            s.model(inputs)
            start = time.perf_counter()
            with profile() as prof:
                for _ in range(times):
                    s.model(inputs)
            wall = time.perf_counter() - start
        events = prof.key_averages()
        total = sum(e.self_cpu_time_total for e in events)
        mm = sum(e.self_cpu_time_total for e in events if e.key in ("aten::mm", "aten::addmm"))
        lines.append(f"| {label} | {wall * 1e3:.0f} | {mm / total:.0%} |")
    return "\n".join(lines)


# Per-call overhead and memory ---------------------------------------------------------


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 16)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


def overhead() -> list[Task]:
    torch.manual_seed(0)
    mlp = MLP().eval()
    xs = torch.randn(4, 16)
    delta = torch.ones(16)

    def raw_save() -> Tensor:
        saved: list[Tensor] = []
        hooked(mlp, {mlp.act: lambda m, a, o: saved.append(o)}, xs)
        return saved[0]

    def raw_add() -> Tensor:
        return hooked(mlp, {mlp.act: lambda m, a, o: o + delta}, xs)

    save, add = [pl.save("act")], [pl.add("act", delta)]
    tasks = [
        Task(
            "per-call overhead, 2-layer MLP: save",
            {
                "bare forward": lambda: mlp(xs),
                "raw hooks": raw_save,
                "purelens": lambda: pl.run(mlp, xs, save)["act"],
            },
            unit="us",
        ),
        Task(
            "per-call overhead, 2-layer MLP: patch (add)",
            {"raw hooks": raw_add, "purelens": lambda: pl.run(mlp, xs, add).output},
            unit="us",
        ),
    ]
    if HAVE_NNSIGHT:
        from nnsight import NNsight

        nm = NNsight(mlp)

        def nn_save() -> Tensor:
            with nm.trace(xs):
                h = nm.act.output.save()
            return h

        def nn_add() -> Tensor:
            with nm.trace(xs):
                nm.act.output = nm.act.output + delta
                out = nm.output.save()
            return out

        tasks[0].approaches["nnsight"] = nn_save
        tasks[1].approaches["nnsight"] = nn_add
    return tasks


SIZES = (1, 4, 16)  # interventions per call in the plan-size rows


def plan_sizes() -> list[Task]:
    """Per-call overhead with 1, 4 and 16 saves, each at its own layer of a 16-layer MLP
    (16 wide, batch 4): what each further site of a plan costs."""
    torch.manual_seed(0)
    deep = nn.Sequential(*[nn.Linear(16, 16) for _ in range(16)]).eval()
    xs = torch.randn(4, 16)
    tasks = []
    for n in SIZES:
        layers = [round(i * 15 / max(n - 1, 1)) for i in range(n)] if n > 1 else [8]
        saves = [pl.save(str(i)) for i in layers]

        def raw(layers: list[int] = layers) -> list[Tensor]:
            saved: list[Tensor] = []
            hooked(deep, {deep[i]: lambda m, a, o: saved.append(o) for i in layers}, xs)
            return saved

        def ours(saves: list[Any] = saves, layers: list[int] = layers) -> list[Tensor]:
            rec = pl.run(deep, xs, saves)
            return [rec[str(i)] for i in layers]

        task = Task(
            f"per-call overhead, 16-layer MLP: {n} save{'s' if n > 1 else ''}",
            {"bare forward": lambda: deep(xs), "raw hooks": raw, "purelens": ours},
            unit="us",
        )
        if HAVE_NNSIGHT:
            from nnsight import NNsight

            nm = NNsight(deep)

            def nn_saves(layers: list[int] = layers, nm: Any = nm) -> list[Tensor]:
                out = []
                with nm.trace(xs):
                    for i in layers:
                        out.append(nm[i].output.save())
                return out

            task.approaches["nnsight"] = nn_saves
        tasks.append(task)
    return tasks


def compiled_runs(s: Setup, quick: bool) -> list[Task]:
    """`pl.compile` against the model compiled bare (`torch.compile`, the same backend):
    the MLP of the overhead rows, and the GPT-2 of the single runs, with one save (the
    model's output is checked against the bare one's). Ratios are to the compiled bare
    model. --quick uses the "eager" backend (no code generation: the path, not the
    speed). nnsight cannot trace a compiled model: no column."""
    backend = "eager" if quick else "inductor"
    torch.manual_seed(0)
    mlp = MLP().eval()
    xs = torch.randn(4, 16)
    bare_mlp = torch.compile(mlp, backend=backend)
    ours_mlp = pl.compile(mlp, backend=backend)
    save = [pl.save("act")]
    site = f"h.{s.middle}"
    bare_gpt = torch.compile(s.model, backend=backend)
    ours_gpt = pl.compile(s.model, backend=backend)
    block = [pl.save(site)]
    return [
        Task(
            "compiled, 2-layer MLP: save",
            {
                "bare forward": lambda: bare_mlp(xs),
                "purelens": lambda: pl.run(ours_mlp, xs, save).output,
            },
            unit="us",
            base="bare forward",
        ),
        Task(
            "compiled, GPT-2: save 1 block",
            {
                "bare forward": lambda: bare_gpt(s.x).logits,
                "purelens": lambda: pl.run(ours_gpt, s.x, block).output.logits,
            },
            base="bare forward",
        ),
    ]


def _status(key: str) -> int:
    return _status_of("/proc/self/status", key)


def _status_of(path: str, key: str) -> int:
    text = Path(path).read_text()
    found = re.search(rf"{key}:\s+(\d+)", text)
    assert found is not None
    return int(found.group(1)) * 1024


def peak_memory(fn: Callable[[], Any], repeats: int) -> float:
    """Median peak resident memory (bytes) a call adds, read off Linux's VmHWM after a reset.

    glibc keeps freed blocks for reuse (its mmap threshold grows with each
    large free), so that a second call would add nothing: a fixed threshold of
    64 KiB makes every tensor larger than that its own mapping, returned on
    free, and `malloc_trim` returns what was kept before.
    """
    import ctypes

    libc = ctypes.CDLL("libc.so.6")
    libc.mallopt(-3, 64 * 1024)  # M_MMAP_THRESHOLD
    peaks = []
    for _ in range(repeats):
        libc.malloc_trim(0)  # give the free blocks kept so far back to the system
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
        before = _status("VmRSS")
        result = fn()
        peaks.append(_status("VmHWM") - before)
        del result
    return statistics.median(peaks)


# Running and the table ---------------------------------------------------------------


def allclose(a: Any, b: Any) -> bool:
    if isinstance(a, Tensor) and isinstance(b, Tensor):
        return a.shape == b.shape and torch.allclose(a.float(), b.float(), atol=1e-4, rtol=1e-3)
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        return len(a) == len(b) and all(allclose(u, v) for u, v in zip(a, b, strict=True))
    return False


def run_task(task: Task, repeats: int, inner: int) -> None:
    with torch.no_grad() if "gradients" not in task.name else torch.enable_grad():
        times: dict[str, list[float]] = {c: [] for c in task.approaches}
        for column, fn in task.approaches.items():
            start = time.perf_counter()
            task.results[column] = fn()  # also the warm-up
            if task.name.endswith("loop"):  # hundreds of passes: warm after the first
                times[column].append(time.perf_counter() - start)
        want = task.results.get(task.base)
        bad = [
            c
            for c, r in task.results.items()
            if c not in (task.base, "bare forward") and not allclose(r, want)
        ]
        task.check = "all agree" if not bad else "DIFFER: " + ", ".join(bad)
        for _ in range(repeats):
            for column, fn in task.approaches.items():
                start = time.perf_counter()
                for _ in range(inner):
                    fn()
                times[column].append((time.perf_counter() - start) / inner)
    task.medians = {c: statistics.median(ts) for c, ts in times.items()}
    task.results.clear()


def cell(task: Task, column: str) -> str:
    if column not in task.medians:
        return "-"
    t = task.medians[column]
    shown = f"{t * 1e6:.1f} us" if task.unit == "us" else f"{t * 1e3:.1f} ms"
    base = task.medians.get(task.base)
    return f"{shown} ({t / base:.2f})" if base else shown


def markdown(tasks: list[Task], columns: list[str]) -> str:
    lines = ["| task | " + " | ".join(columns) + " | check |", "|---" * (len(columns) + 2) + "|"]
    for task in tasks:
        lines.append(
            f"| {task.name} | " + " | ".join(cell(task, c) for c in columns) + f" | {task.check} |"
        )
    return "\n".join(lines)


def targets(tasks: dict[str, Task], memory: dict[str, float]) -> str:
    def ratio(task: str, a: str, b: str) -> float:
        return tasks[task].medians[a] / tasks[task].medians[b]

    def diff_us(task: str) -> float:
        return (tasks[task].medians["purelens"] - tasks[task].medians["raw hooks"]) * 1e6

    rows: list[tuple[str, str, bool | None]] = []
    save, add = tasks["overhead save"], tasks["overhead add"]
    rows.append(
        (
            "MLP save overhead over raw hooks <= +15 us",
            f"{diff_us('overhead save'):+.1f} us",
            diff_us("overhead save") <= 15,
        )
    )
    if "nnsight" in save.medians:
        for key, t in (("save", save), ("patch", add)):
            over = (
                t.medians["purelens"]
                - t.medians["bare forward" if "bare forward" in t.medians else "raw hooks"]
            )
            nn_over = (
                t.medians["nnsight"]
                - t.medians["bare forward" if "bare forward" in t.medians else "raw hooks"]
            )
            rows.append(
                (
                    f"MLP {key}: overhead >= 3x lower than nnsight",
                    f"{nn_over / over:.1f}x lower",
                    nn_over / over >= 3,
                )
            )
    for key in ("save 1 block", "save every block", "patch 1 position"):
        r = ratio(key, "purelens", "raw hooks")
        rows.append((f"{key}: within 3% of raw hooks", f"{r:.3f}", r <= 1.03))
    for key in ("sweep batched", "steering batched"):
        r = ratio(key, "purelens", "raw hooks")
        rows.append(
            (f"{tasks[key].name}: within 10% of hand-batched raw hooks", f"{r:.3f}", r <= 1.10)
        )
    for key, loop, need in (
        ("sweep batched", "sweep loop", 3),
        ("steering batched", "steering loop", 5),
    ):
        if "nnsight" in tasks[loop].medians:
            speed = tasks[loop].medians["nnsight"] / tasks[key].medians["purelens"]
            rows.append(
                (
                    f"{tasks[key].name}: >= {need}x faster than the nnsight loop",
                    f"{speed:.1f}x",
                    speed >= need,
                )
            )
    r = ratio("generate", "purelens", "raw hooks")
    rows.append(
        ("generation with a per-step save: within 5% of HF generate + hook", f"{r:.3f}", r <= 1.05)
    )
    if memory and memory["raw hooks"] > 2**20:  # below a MiB, page granularity is noise
        r = memory["purelens"] / memory["raw hooks"]
        rows.append(("peak memory of a 1-site save: within 5% of raw hooks", f"{r:.3f}", r <= 1.05))
    lines = ["| target | measured | met |", "|---|---:|---|"]
    lines += [f"| {t} | {m} | {'yes' if ok else 'NO'} |" for t, m, ok in rows]
    return "\n".join(lines)


def speed_targets(
    tasks: dict[str, Task], sizes: list[Task], compiled: list[Task], quick: bool
) -> str:
    """The per-call targets of issue 16 (all overheads over raw hooks)."""

    def over(task: Task, column: str = "purelens", base: str = "raw hooks") -> float:
        return (task.medians[column] - task.medians[base]) * 1e6

    save, add = tasks["overhead save"], tasks["overhead add"]
    rows: list[tuple[str, str, bool]] = [
        ("pl.run, one save: <= +5 us over raw hooks", f"{over(save):+.1f} us", over(save) <= 5),
        ("pl.run, one patch: <= +6 us over raw hooks", f"{over(add):+.1f} us", over(add) <= 6),
    ]
    if "nnsight" in save.medians:
        times = over(save, "nnsight") / max(over(save), 1e-9)
        rows.append(("nnsight's overhead >= 10x purelens's (save)", f"{times:.1f}x", times >= 10))
    first, last = sizes[0], sizes[-1]
    further = (over(last) - over(first)) / (SIZES[-1] - SIZES[0])
    rows.append(
        (
            f"each further site of a {SIZES[-1]}-site plan: <= +1.5 us",
            f"{further:+.2f} us",
            further <= 1.5,
        )
    )
    if not quick:
        for task, need in ((compiled[0], 1.10), (compiled[1], 1.02)):
            r = task.medians["purelens"] / task.medians["bare forward"]
            rows.append((f"{task.name}: <= {need:.2f}x compiled bare", f"{r:.3f}", r <= need))
    lines = ["| target | measured | met |", "|---|---:|---|"]
    lines += [f"| {t} | {m} | {'yes' if ok else 'NO'} |" for t, m, ok in rows]
    return "\n".join(lines)


def setup(quick: bool) -> Setup:
    model = gpt2(2, 64, 4, 500) if quick else gpt2(12, 768, 12, 50257)
    model.generation_config.pad_token_id = 0
    x = torch.randint(0, model.config.vocab_size, (2, 8) if quick else (8, 32))
    layers = len(model.transformer.h)
    s = Setup(model, x, layers, layers // 2)
    if HAVE_NNSIGHT:
        from nnsight import LanguageModel, NNsight

        s.nn_model = NNsight(model)
        s.lm = LanguageModel(model, tokenizer=_tokenizer(model.config.vocab_size))
    if HAVE_TL:
        from transformer_lens.model_bridge.sources._bridge_builder import build_bridge_from_module

        # The bridge rebuilds the module it wraps in place: give it its own copy of the weights.
        s.bridge = build_bridge_from_module(
            copy.deepcopy(model), "GPT2LMHeadModel", hf_config=model.config
        )
    return s


def _memory_gib() -> str:
    try:
        return f"{_status_of('/proc/meminfo', 'MemTotal') / 2**30:.0f}"
    except OSError:
        return "?"


def _tokenizer(vocab: int) -> Any:
    """A word-level tokenizer over the whole vocabulary: nnsight's LanguageModel needs one."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    words = {f"w{i}": i for i in range(vocab)}
    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel(words, unk_token="w1")),
        unk_token="w1",
        pad_token="w0",
        eos_token="w0",
    )


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes and few repeats")
    parser.add_argument("--out", type=Path, help="also write the tables to this Markdown file")
    args = parser.parse_args(argv)
    quick = args.quick
    torch.set_num_threads(2)
    warnings.filterwarnings("ignore")
    from transformers.utils import logging

    logging.set_verbosity_error()
    start = time.perf_counter()
    s = setup(quick)
    repeats = 3 if quick else 7
    positions, vectors, tokens, new = (4, 4, 8, 3) if quick else (16, 64, 32, 8)
    sweep_loop, sweep_batched = patching_sweep(s, positions)
    (steer_loop, steer_batched), paths = steering_sweep(s, vectors, tokens)
    single = single_runs(s)
    over_save, over_add = overhead()
    named = {
        "save 1 block": single[0],
        "save every block": single[1],
        "patch 1 position": single[2],
        "sweep loop": sweep_loop,
        "sweep batched": sweep_batched,
        "grads": gradients(s),
        "generate": generation(s, new),
        "steering loop": steer_loop,
        "steering batched": steer_batched,
        "overhead save": over_save,
        "overhead add": over_add,
    }
    for key, task in named.items():
        loops = key.endswith("loop")
        run_task(
            task,
            1 if quick else (1 if loops else 3 if "batched" in key else repeats),
            inner=(20 if quick else 300) if task.unit == "us" else 1,
        )
    run_task(paths, 1 if quick else 3, inner=1)
    sizes = plan_sizes()
    compiled = compiled_runs(s, quick)
    for task in sizes + compiled:
        micro = task.unit == "us"
        run_task(
            task, 3 if quick else (15 if micro else repeats), (20 if quick else 300) if micro else 1
        )

    memory: dict[str, float] = {}
    if platform.system() == "Linux":
        approaches = named["save 1 block"].approaches
        with torch.no_grad():
            for fn in approaches.values():
                fn()
            memory = {c: peak_memory(fn, repeats) for c, fn in approaches.items()}

    title = (
        f"GPT-2-small shape ({s.layers} layers, d={s.model.config.n_embd}, random weights)"
        if not quick
        else "tiny GPT-2 (--quick smoke run)"
    )
    parts = [
        f"Machine: {platform.machine()}, {os.cpu_count()} cores, {_memory_gib()} GiB, "
        f"{torch.get_num_threads()} threads, "
        f"torch {torch.__version__}; "
        f"{title}; single runs on {s.x.shape[0]} x {s.x.shape[1]} tokens. Medians of interleaved "
        "repeats; in brackets the ratio to raw hooks (hand-batched raw hooks for batched rows).",
        markdown(list(named.values()), COLUMNS),
        "Peak memory a call adds (MiB, Linux VmHWM), save 1 block:\n\n"
        + (
            "| "
            + " | ".join(memory)
            + " |\n"
            + "|---" * len(memory)
            + "|\n| "
            + " | ".join(f"{v / 2**20:.1f}" for v in memory.values())
            + " |"
            if memory
            else "not measured (not Linux)"
        ),
        "Paths of `pl.sweep` for the steering sweep "
        "(ratio to folding with SDPA attention):\n\n" + markdown([paths], list(paths.approaches)),
        "Why batching gains little on this CPU (the same model, plain forwards): both ways spend "
        "their time in matrix products, at about the same rate per token, so one batched pass "
        "costs about as much as the loop; batching wins on GPUs, where a small pass leaves most "
        "of the device idle. vmap wins beyond that by computing the prefix before the steered "
        "block once.\n\n" + batching_profile(s, tokens, 8),
        "Per-call overhead by plan size (saves at distinct layers), in brackets the ratio to "
        "raw hooks:\n\n" + markdown(sizes, COLUMNS[:4]),
        "`pl.compile` against the model compiled bare (same backend"
        + (", here the eager one" if quick else ", inductor")
        + "; first calls, which compile, not timed), in brackets the ratio to the compiled bare "
        "model:\n\n" + markdown(compiled, ["bare forward", "purelens"]),
        "Targets (issue 7):\n\n" + targets(named, memory),
        "Targets (issue 16):\n\n" + speed_targets(named, sizes, compiled, quick),
        f"Ran in {time.perf_counter() - start:.0f} s.",
    ]
    text = "\n\n".join(parts)
    print(text)
    if args.out:
        args.out.write_text(
            "# Benchmarks: purelens, raw hooks, nnsight, TransformerLens\n\n" + text + "\n"
        )
    return text


if __name__ == "__main__":
    main()
