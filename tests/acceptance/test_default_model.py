"""The bundled model: it loads like a hub model, it learned its tasks, and purelens
finds the mechanisms it was trained to have."""

from __future__ import annotations

import random

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer

import purelens as pl
from purelens.experiments import activation_patching, head_patching
from purelens.models import DEFAULT_PATH
from purelens.models.tasks import Tasks
from purelens.models.train_default import INDUCTION_HEAD, copy_accuracy, evaluate


@pytest.fixture(scope="module")
def bundled() -> tuple[nn.Module, object, Tasks]:
    model, tokenizer = pl.models.load_default()
    return model, tokenizer, Tasks.make()


def test_loads_exactly_as_a_hub_model() -> None:
    model = AutoModelForCausalLM.from_pretrained(DEFAULT_PATH)
    tokenizer = AutoTokenizer.from_pretrained(DEFAULT_PATH)
    assert type(model).__name__ == "GPT2LMHeadModel" and model.config.n_embd == 128
    weights = DEFAULT_PATH / "model.safetensors"
    assert weights.stat().st_size <= 10 * 2**20
    ids = tokenizer("leibrund lives in")["input_ids"]
    assert tokenizer.convert_ids_to_tokens(ids) == ["<bos>", "leibrund", "lives", "in"]


def test_it_learned_its_tasks(bundled: tuple[nn.Module, object, Tasks]) -> None:
    model, tokenizer, tasks = bundled
    scores = evaluate(model, tokenizer, tasks)
    print(scores)
    assert scores["copy"] >= 0.95
    assert scores["facts (trained phrasings)"] >= 0.95
    assert scores["facts (held-out phrasings)"] >= 0.95


def test_activation_patching_localizes_the_fact(bundled: tuple[nn.Module, object, Tasks]) -> None:
    model, tokenizer, tasks = bundled
    for i in range(0, 40, 8):
        person = tasks.people[i]
        other = next(q for q in tasks.people[i + 1 :] if tasks.facts[q] != tasks.facts[person])
        for template in ("{} lives in", "the home of {} is"):
            clean, corrupt = template.format(person), template.format(other)
            result = activation_patching(model, tokenizer, clean, corrupt, tasks.facts[person])
            subject = result.tokens.index(person)
            scores = result.scores
            # Layer by layer the fact sits at the subject's token, then at the last token
            # from some block on (the one that moves it); no other position carries it.
            at_subject = scores[:, subject] > 0.9
            at_last = scores[:, -1] > 0.9
            assert at_subject[0] and at_last[-1], (clean, scores)
            assert (at_subject | at_last).all(), (clean, scores)
            moved = int(at_last.int().argmax())
            assert at_subject[:moved].all() and not at_subject[moved:].any(), (clean, scores)
            others = [
                p for p in range(len(result.tokens)) if p not in (subject, len(result.tokens) - 1)
            ]
            assert (scores[:, others].abs() < 0.1).all(), (clean, scores)


def copy_batch(
    tokenizer: object, tasks: Tasks, n: int = 64, length: int = 8
) -> tuple[torch.Tensor, torch.Tensor]:
    """Repeated sequences, and the same with the first copy replaced by other symbols."""
    rng = random.Random(7 + length)
    seqs = [tasks.repeat(rng, length=length) for _ in range(n)]
    clean = torch.tensor([tokenizer(" ".join(s))["input_ids"] for s in seqs])  # type: ignore[operator]
    corrupt = clean.clone()
    noise = [tokenizer.convert_tokens_to_ids(rng.choice(tasks.symbols)) for _ in range(n * length)]  # type: ignore[attr-defined]
    corrupt[:, 1 : length + 1] = torch.tensor(noise).view(n, length)
    return clean, corrupt


def zero_head(layer: int, head: int) -> pl.Intervention:
    return pl.patch(f"h.{layer}.attn:z", pl.head(head, torch.zeros_like))


def attention_after_earlier_occurrence(
    head: tuple[int, int], tokenizer: object, tasks: Tasks, length: int
) -> torch.Tensor:
    """Mean attention from each word of the repeat to the j-th word after its earlier occurrence.

    Entry ``j - 1`` for j = 1, 2, 3, 4. A classic induction head attends at
    j = 1 (the word that followed); any induction head attends at one fixed j
    whatever the length of the sequence, since it finds the earlier
    occurrence by content, not by position.
    """
    clean, _ = copy_batch(tokenizer, tasks, length=length)
    model, _ = pl.models.load_default()
    site = f"h.{head[0]}.attn:pattern"
    with torch.no_grad():
        attention = pl.run(model, clean, [pl.save(site, pl.head(head[1]))])[site]
    # Word i of the sequence is token i + 1; the repeat's words are tokens length + 1 ...
    queries = range(length + 1, 2 * length + 1)
    return torch.stack(
        [
            torch.stack(
                [attention[:, q, q - length + j] for q in queries if q - length + j < q]
            ).mean()
            for j in range(1, 5)
        ]
    )


def test_ablating_the_induction_head_found_by_patching(
    bundled: tuple[nn.Module, object, Tasks],
) -> None:
    model, tokenizer, tasks = bundled
    clean, corrupt = copy_batch(tokenizer, tasks)
    targets = clean[:, 10:17]

    def copy_logprob(out: object) -> torch.Tensor:
        return out.logits[:, 9:16].log_softmax(-1).gather(-1, targets[..., None]).mean()  # type: ignore[attr-defined]

    result = head_patching(model, clean, corrupt, copy_logprob)
    effect = result.effect
    layer, head = result.best()
    # Patching finds the head that training confined copying to: the ground truth.
    assert (layer, head) == INDUCTION_HEAD, result
    assert result.layers == ["h.0", "h.1"] and result.clean > result.corrupt
    assert f"{effect[layer, head].item():.2f}" in str(result)  # a table: layers x heads

    # It attends where an induction head does: a fixed number of words after the
    # earlier occurrence of the current word, for sequences of any length.
    by_length = {
        n: attention_after_earlier_occurrence((layer, head), tokenizer, tasks, n)
        for n in (6, 8, 10)
    }
    offsets = {n: int(a.argmax()) + 1 for n, a in by_length.items()}
    assert len(set(offsets.values())) == 1, by_length
    assert all(float(a.max()) > 0.5 for a in by_length.values()), by_length

    base = copy_accuracy(model, tokenizer, tasks)
    ablated = copy_accuracy(model, tokenizer, tasks, [zero_head(layer, head)])
    heads = [(i, j) for i in range(effect.shape[0]) for j in range(effect.shape[1])]
    others = [pair for pair in heads if pair != (layer, head)]
    other = random.Random(0).choice(others)
    other_ablated = copy_accuracy(model, tokenizer, tasks, [zero_head(*other)])
    print(f"copy {base:.3f}; top head {(layer, head)} ablated {ablated:.3f}")
    print(f"head {other} ablated {other_ablated:.3f}")
    assert base - ablated >= 0.5
    assert base - other_ablated < 0.5
    # No head but the induction head is needed that much: every other ablation keeps
    # copying above half.
    for pair in others:
        assert base - copy_accuracy(model, tokenizer, tasks, [zero_head(*pair)]) < 0.5, pair
