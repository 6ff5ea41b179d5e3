"""Train the bundled default model: a small GPT-2 on induction and factual recall.

    python -m purelens.models.train_default --out purelens/models/default

Deterministic for a seed (one CPU thread, so the same weights on any
machine); about 27 minutes on this project's CPU machine. The tasks and the
held-out phrasings are in `purelens.models.tasks`; `evaluate` measures what
the README reports.

The recipe, and why:

* Copy sequences are repeated **three times** (3-12 symbols, 0-20 filler
  words): twice the supervised positions of two copies, which takes the
  model off the loss plateau where induction has not formed yet sooner.
  Varying lengths and fillers make copying by fixed positions useless.
* Position embeddings start as sinusoids (small scale, then trained), so that
  attending a fixed distance back is easy to learn.
* Trained freely (`STEPS`), the model copies with all four heads of its last
  block alike, so that no single head matters. **`confine` then makes the
  copying circuit known by construction**: the block's heads but
  `INDUCTION_HEAD` start again from random weights and are zeroed on the copy
  rows (`pl.scale` on the input of the output projection, those rows only)
  for `CONFINE_STEPS` more steps; they relearn the facts and never copying.
  Like the semi-synthetic models of InterpBench, this gives interpretability
  methods a ground truth: head patching and ablation must find head (1, 0).
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

__all__ = [
    "CONFIG",
    "INDUCTION_HEAD",
    "batch",
    "build_model",
    "build_tokenizer",
    "confine",
    "evaluate",
    "fit",
    "only_the_induction_head",
    "train",
]

CONFIG = {"n_layer": 2, "n_embd": 128, "n_head": 4, "n_positions": 64}
SEED = 0
STEPS = 8000
LR = 2e-3
WEIGHT_DECAY = 0.1
CONFINE_STEPS = 2000
CONFINE_LR = 1e-3
COPY_FRACTION = 2 / 3
COPIES = 3  # a copy sequence in training: the symbols, repeated this many times
LENGTHS = (3, 12)  # distinct symbols in a copy sequence
MAX_FILLER = 20  # random words before it
INDUCTION_HEAD = (1, 0)  # (block, head): the only head of the last block that may copy


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


def batch(
    tasks: Tasks, tokenizer: Any, rng: random.Random, size: int
) -> tuple[dict[str, torch.Tensor], list[int]]:
    """Copy sequences and facts (trained phrasings), mixed; and the rows that are copying.

    Labels are on the predictable words only: the repeats of a copy sequence
    from their second word on (the first repeat's first word is not
    predictable), and the city of a fact.
    """
    rows, label_rows, copy_rows = [], [], []
    vocab = tokenizer.get_vocab()
    facts = tasks.trained_facts()
    for row in range(size):
        if rng.random() < COPY_FRACTION:
            copy_rows.append(row)
            n = rng.randint(*LENGTHS)
            seq = rng.sample(tasks.symbols, n)
            room = CONFIG["n_positions"] - 1 - COPIES * n
            k = rng.randint(0, min(MAX_FILLER, room))
            others = [s for s in tasks.symbols if s not in seq]
            words = [rng.choice(others) for _ in range(k)] + seq * COPIES
            first = k + n + 1  # word index of the first predictable word
        else:
            prompt, city = rng.choice(facts)
            words = f"{prompt} {city}".split()
            first = len(words) - 1
        ids = [vocab["<bos>"]] + [vocab[w] for w in words]  # what the tokenizer gives
        rows.append(ids)
        label_rows.append([-100] * (first + 1) + ids[first + 1 :])  # word i is token i + 1
    width = max(len(r) for r in rows)
    pad = tokenizer.pad_token_id
    return {
        "input_ids": torch.tensor([r + [pad] * (width - len(r)) for r in rows]),
        "attention_mask": torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows]),
        "labels": torch.tensor([r + [-100] * (width - len(r)) for r in label_rows]),
    }, copy_rows


def only_the_induction_head(copy_rows: list[int]) -> pl.Intervention:
    """Zero every head of the last block but `INDUCTION_HEAD`'s, on the copy rows."""
    block, head = INDUCTION_HEAD
    width = CONFIG["n_embd"] // CONFIG["n_head"]
    mask = torch.zeros(CONFIG["n_embd"])
    mask[head * width : (head + 1) * width] = 1
    return pl.scale(f"h.{block}.attn.c_proj:input", mask, batch=copy_rows)


def sinusoids(n_positions: int, width: int, scale: float = 0.03) -> torch.Tensor:
    """Sinusoidal position embeddings (as in "Attention is all you need"), times `scale`."""
    position = torch.arange(n_positions)[:, None].float()
    angle = position / 10000 ** (torch.arange(0, width, 2).float() / width)
    out = torch.zeros(n_positions, width)
    out[:, 0::2], out[:, 1::2] = torch.sin(angle), torch.cos(angle)
    return out * scale


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
    out: Path | None,
    steps: int = STEPS,
    seed: int = SEED,
    batch_size: int = 64,
    confine_steps: int = CONFINE_STEPS,
) -> tuple[nn.Module, Any, dict[str, float]]:
    """Train from scratch, then confine copying to `INDUCTION_HEAD`; save to `out` when given."""
    torch.manual_seed(seed)
    tasks = Tasks.make(seed)
    tokenizer = build_tokenizer(tasks)
    model = build_model(len(tokenizer), seed).train()
    with torch.no_grad():
        wpe = model.transformer.wpe.weight  # type: ignore[union-attr]
        wpe.copy_(sinusoids(CONFIG["n_positions"], CONFIG["n_embd"]))  # type: ignore[operator]
    rng = random.Random(seed)
    fit(model, tasks, tokenizer, rng, steps, LR, batch_size, confine=False)
    confine(model, tasks, tokenizer, rng, confine_steps, batch_size, seed)
    model.eval()
    scores = evaluate(model, tokenizer, tasks)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(out)  # type: ignore[operator]
        tokenizer.save_pretrained(out)
    return model, tokenizer, scores


def confine(
    model: nn.Module,
    tasks: Tasks,
    tokenizer: Any,
    rng: random.Random,
    steps: int = CONFINE_STEPS,
    batch_size: int = 64,
    seed: int = SEED,
) -> None:
    """Make `INDUCTION_HEAD` the only head of its block that copies.

    The block's other heads start again from random weights, and are zeroed
    on the copy rows while training goes on: they learn the facts again, and
    never copying.
    """
    block, keep = INDUCTION_HEAD
    attn = model.transformer.h[block].attn  # type: ignore[union-attr, index]
    width = CONFIG["n_embd"] // CONFIG["n_head"]
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for head in range(CONFIG["n_head"]):
            if head == keep:
                continue
            cols = slice(head * width, (head + 1) * width)
            for part in range(3):  # query, key, value columns of c_attn
                start = part * CONFIG["n_embd"]
                span = slice(start + cols.start, start + cols.stop)
                attn.c_attn.weight[:, span] = (
                    torch.randn(CONFIG["n_embd"], width, generator=generator) * 0.02
                )
                attn.c_attn.bias[span] = 0
            attn.c_proj.weight[cols] = (
                torch.randn(width, CONFIG["n_embd"], generator=generator) * 0.02
            )
    fit(model, tasks, tokenizer, rng, steps, CONFINE_LR, batch_size, confine=True)


def fit(
    model: nn.Module,
    tasks: Tasks,
    tokenizer: Any,
    rng: random.Random,
    steps: int,
    lr: float,
    batch_size: int,
    *,
    confine: bool,
) -> None:
    """AdamW with warmup and cosine decay; with `confine`, copying only through `INDUCTION_HEAD`."""
    from tqdm.auto import tqdm

    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=WEIGHT_DECAY)
    factors = list(_schedule(steps, warmup=steps // 20))
    what = "confining copying to head " + str(INDUCTION_HEAD) if confine else "training"
    progress = tqdm(range(steps), desc=what, unit="step")
    for step in progress:
        for group in optimizer.param_groups:
            group["lr"] = lr * factors[step]
        inputs, copy_rows = batch(tasks, tokenizer, rng, batch_size)
        interventions = [only_the_induction_head(copy_rows)] if confine else []
        loss = pl.run(model, inputs, interventions).output.loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        if step % 50 == 0:
            progress.set_postfix(loss=f"{loss.item():.3f}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "default")
    parser.add_argument("--steps", type=int, default=STEPS, help="steps of free training")
    parser.add_argument(
        "--confine-steps",
        type=int,
        default=CONFINE_STEPS,
        help="steps confining copying to the induction head",
    )
    parser.add_argument("--seed", type=int, default=SEED)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # deterministic: the same model on any machine
    start = time.perf_counter()
    _, _, scores = train(args.out, args.steps, args.seed, confine_steps=args.confine_steps)
    print(f"trained in {time.perf_counter() - start:.0f} s; saved to {args.out}")
    for name, value in scores.items():
        print(f"  {name}: {value:.1%}")


if __name__ == "__main__":
    main()
