"""Train the bundled default model: a small GPT-2 on induction and factual recall.

    python -m purelens.models.train_default --out purelens/models/default

Deterministic for a seed; about 10 minutes on 2 CPU cores. The tasks and the
held-out phrasings are in `purelens.models.tasks`; `evaluate` measures what
the README reports.
"""

from __future__ import annotations

import argparse
import math
import random
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

import purelens as pl

from .tasks import Tasks

__all__ = ["CONFIG", "batch", "build_model", "build_tokenizer", "evaluate", "train"]

CONFIG = {"n_layer": 3, "n_embd": 128, "n_head": 4, "n_positions": 32}
SEED = 0


def build_tokenizer(tasks: Tasks) -> Any:
    """A word-level tokenizer over the tasks' vocabulary (a `transformers` fast tokenizer)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(tasks.vocabulary())}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.decoder = decoders.WordPiece(cleanup=False)  # words joined by spaces
    backend.post_processor = processors.TemplateProcessing(
        single="<bos> $A", special_tokens=[("<bos>", vocab["<bos>"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<bos>",
        eos_token="<eos>",
        unk_token="<unk>",
        pad_token="<pad>",
        padding_side="right",
        model_max_length=CONFIG["n_positions"],
    )


def build_model(vocab_size: int, seed: int = SEED, **overrides: int) -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=vocab_size,
        bos_token_id=2,
        eos_token_id=3,
        pad_token_id=0,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        **{**CONFIG, **overrides},  # type: ignore[arg-type]
    )
    return GPT2LMHeadModel(config)


def batch(tasks: Tasks, tokenizer: Any, rng: random.Random, size: int) -> dict[str, torch.Tensor]:
    """Two thirds induction, one third facts (trained phrasings): ids, mask, labels on answers."""
    rows, label_rows = [], []
    facts = tasks.trained_facts()
    for i in range(size):
        if i % 3 != 2:
            words, predictable = tasks.copy_example(rng)
            ids = tokenizer(" ".join(words))["input_ids"]  # <bos> first: word i is at i + 1
            labels = [-100] * len(ids)
            for index in predictable:
                labels[index + 1] = ids[index + 1]
        else:
            prompt, city = rng.choice(facts)
            ids = tokenizer(f"{prompt} {city}")["input_ids"]
            labels = [-100] * (len(ids) - 1) + [ids[-1]]
        rows.append(ids)
        label_rows.append(labels)
    width = max(len(r) for r in rows)
    pad = tokenizer.pad_token_id
    return {
        "input_ids": torch.tensor([r + [pad] * (width - len(r)) for r in rows]),
        "attention_mask": torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows]),
        "labels": torch.tensor([r + [-100] * (width - len(r)) for r in label_rows]),
    }


def _next_token_accuracy(
    model: nn.Module, tokenizer: Any, prompts: list[str], answers: list[str], ivs: Any
) -> float:
    batch_ = pl.tokenize(tokenizer, prompts)
    last = pl.last_token(batch_["attention_mask"])
    with torch.no_grad():
        rec = pl.run(model, batch_, [*ivs, pl.save("lm_head", pl.at(last), name="next")])
    predicted = tokenizer.convert_ids_to_tokens(rec["next"].argmax(-1).tolist())
    return sum(p == a for p, a in zip(predicted, answers, strict=True)) / len(answers)


def copy_accuracy(
    model: nn.Module, tokenizer: Any, tasks: Tasks, ivs: Any = (), n: int = 24, seed: int = 1
) -> float:
    """Accuracy on the predictable words of new sequences, every length 5-10 and filler 0-10."""
    rng = random.Random(seed)
    correct = total = 0
    for length in range(5, 11):
        for filler in range(0, 11, 2):  # one batch per shape: no padding
            examples = [tasks.copy_example(rng, length, filler) for _ in range(n)]
            ids = torch.tensor([tokenizer(" ".join(words))["input_ids"] for words, _ in examples])
            with torch.no_grad():
                logits = pl.run(model, ids, ivs).output.logits
            where = torch.tensor(list(examples[0][1]))  # word i is token i + 1, predicted at i
            correct += int((logits[:, where].argmax(-1) == ids[:, where + 1]).sum())
            total += ids.shape[0] * len(where)
    return correct / total


def evaluate(model: nn.Module, tokenizer: Any, tasks: Tasks, ivs: Any = ()) -> dict[str, float]:
    """Copy accuracy on new sequences; fact accuracy on trained and held-out phrasings."""
    trained = tasks.trained_facts()
    held = tasks.held_out_facts()
    return {
        "copy": copy_accuracy(model, tokenizer, tasks, ivs),
        "facts (trained phrasings)": _next_token_accuracy(
            model, tokenizer, [p for p, _ in trained], [c for _, c in trained], ivs
        ),
        "facts (held-out phrasings)": _next_token_accuracy(
            model, tokenizer, [p for p, _ in held], [c for _, c in held], ivs
        ),
    }


def _schedule(steps: int, warmup: int) -> Iterator[float]:
    for step in range(steps):
        if step < warmup:
            yield (step + 1) / warmup
        else:
            progress = (step - warmup) / max(1, steps - warmup)
            yield 0.5 * (1 + math.cos(progress * math.pi))


def train(
    out: Path | None, steps: int = 8000, seed: int = SEED, batch_size: int = 64
) -> tuple[nn.Module, Any, dict[str, float]]:
    """Train from scratch; save with `save_pretrained` to `out` when given."""
    from tqdm.auto import tqdm

    torch.manual_seed(seed)
    tasks = Tasks.make(seed)
    tokenizer = build_tokenizer(tasks)
    model = build_model(len(tokenizer), seed).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    rng = random.Random(seed)
    factors = list(_schedule(steps, warmup=steps // 20))
    progress = tqdm(range(steps), desc="training", unit="step")
    for step in progress:
        for group in optimizer.param_groups:
            group["lr"] = 3e-3 * factors[step]
        loss = model(**batch(tasks, tokenizer, rng, batch_size)).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        if step % 50 == 0:
            progress.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()
    scores = evaluate(model, tokenizer, tasks)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(out)  # type: ignore[operator]
        tokenizer.save_pretrained(out)
    return model, tokenizer, scores


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "default")
    parser.add_argument("--steps", type=int, default=8000)
    parser.add_argument("--seed", type=int, default=SEED)
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    start = time.perf_counter()
    _, _, scores = train(args.out, args.steps, args.seed)
    print(f"trained in {time.perf_counter() - start:.0f} s; saved to {args.out}")
    for name, value in scores.items():
        print(f"  {name}: {value:.1%}")


if __name__ == "__main__":
    main()
