"""The training script of the bundled model runs (a few steps: the real run takes minutes)."""

from __future__ import annotations

from pathlib import Path

from transformers import AutoModelForCausalLM, AutoTokenizer

import purelens as pl
from purelens.models.tasks import TEMPLATES, Tasks
from purelens.models.train_default import main


def test_training_saves_a_loadable_model(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    main(["--out", str(tmp_path), "--steps", "10", "--confine-steps", "10"])
    printed = capsys.readouterr().out
    assert "facts (held-out phrasings)" in printed
    model = AutoModelForCausalLM.from_pretrained(tmp_path)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    assert model.config.vocab_size == len(tokenizer) == len(Tasks.make().vocabulary())
    assert pl.run(model, "the home of", tokenizer=tokenizer).output.logits.shape[:2] == (1, 4)


def test_every_phrasing_is_trained_and_each_fact_keeps_one_held_out() -> None:
    tasks = Tasks.make()
    trained, held = tasks.trained_facts(), tasks.held_out_facts()
    assert len(held) == len(tasks.people) and len(trained) == len(tasks.people) * (
        len(TEMPLATES) - 1
    )
    assert not set(held) & set(trained)
    phrasings = {t.split("{e}")[0] for t in TEMPLATES}
    assert all(any(p.startswith(ph) for p, _ in trained) for ph in phrasings)
