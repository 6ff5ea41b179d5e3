"""The synthetic tasks the bundled model is trained on, with mechanisms we know.

* **Induction (copying)**: a few random filler words, a random sequence of
  symbol words, then the same sequence again (`train_default` repeats it
  three times); from the second word of the first repeat on, each next word
  is predictable only by finding the earlier occurrence of the current word
  and copying what followed it (an induction head). The filler and the
  varying length move the sequence, so no fixed position can be learned.
* **Factual recall**: made-up people, each bound to a city, stated in several
  phrasings ("Bilora lives in Paris"). Each person's fact is trained in all
  phrasings but one, which is held out to test that the fact is recalled
  whatever the phrasing.

Everything is deterministic from the seed, so the tests regenerate the same
people, cities and held-out phrasings.
"""

from __future__ import annotations

import dataclasses
import random

__all__ = ["SPECIALS", "TEMPLATES", "Tasks"]

SPECIALS = ["<pad>", "<unk>", "<bos>", "<eos>"]

# {e} is the person, {c} the city; the city is always the last word.
TEMPLATES = [
    "{e} lives in {c}",
    "{e} resides in {c}",
    "the home of {e} is {c}",
    "{e} is from {c}",
    "where does {e} live ? {c}",
]

CITIES = (
    "paris tokyo lima cairo oslo delhi rome quito dakar hanoi berlin madrid sydney nairobi "
    "lagos dublin vienna prague havana kyoto seoul bogota tunis doha"
).split()

_ONSETS = "b br c d dr f g gr h j k kl l m n p pl qu r s st t tr v w z".split()
_VOWELS = "a e i o u ai ei ou".split()
_CODAS = ["", "", "n", "r", "s", "x", "l", "th", "nd"]


def _words(rng: random.Random, n: int, syllables: int, taken: set[str]) -> list[str]:
    out: list[str] = []
    while len(out) < n:
        word = "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) for _ in range(syllables))
        word += rng.choice(_CODAS)
        if word not in taken:
            taken.add(word)
            out.append(word)
    return out


@dataclasses.dataclass(frozen=True)
class Tasks:
    """The people, cities, symbols and phrasings of one seed."""

    people: tuple[str, ...]
    cities: tuple[str, ...]
    symbols: tuple[str, ...]
    facts: dict[str, str]  # person -> city
    held_out: dict[str, int]  # person -> index of the template held out for them

    @classmethod
    def make(cls, seed: int = 0, n_people: int = 240, n_symbols: int = 64) -> Tasks:
        rng = random.Random(seed)
        taken = set(CITIES) | {w for t in TEMPLATES for w in t.split()}
        people = _words(rng, n_people, 2, taken)
        symbols = _words(rng, n_symbols, 1, taken)
        facts = {p: rng.choice(CITIES) for p in people}
        held_out = {p: i % len(TEMPLATES) for i, p in enumerate(people)}
        return cls(tuple(people), tuple(CITIES), tuple(symbols), facts, held_out)

    def vocabulary(self) -> list[str]:
        template_words = sorted({w for t in TEMPLATES for w in t.split() if w[0] != "{"})
        return [*SPECIALS, *template_words, *self.cities, *self.people, *self.symbols]

    def fact(self, person: str, template: int) -> tuple[str, str]:
        """The prompt (without the city) and the city, in one phrasing."""
        text = TEMPLATES[template].format(e=person, c="").strip()
        return text, self.facts[person]

    def trained_facts(self) -> list[tuple[str, str]]:
        return [
            self.fact(p, t)
            for p in self.people
            for t in range(len(TEMPLATES))
            if t != self.held_out[p]
        ]

    def held_out_facts(self) -> list[tuple[str, str]]:
        return [self.fact(p, self.held_out[p]) for p in self.people]

    def repeat(self, rng: random.Random, length: int | None = None) -> list[str]:
        """A sequence of distinct random symbols followed by itself.

        Distinct, so that every word of the second copy has one earlier
        occurrence to copy from: the task has one right answer.
        """
        n = length or rng.randint(5, 10)
        seq = rng.sample(self.symbols, n)
        return seq + seq

    def copy_example(
        self, rng: random.Random, length: int | None = None, filler: int | None = None
    ) -> tuple[list[str], range]:
        """Filler words, then a repeated sequence; and the indices of the predictable words.

        The words at the returned indices (the second copy from its second word
        on) follow from the first copy; the filler and the first copy do not.
        """
        k = rng.randint(0, 10) if filler is None else filler
        repeated = self.repeat(rng, length)
        others = [s for s in self.symbols if s not in repeated]
        words = [rng.choice(others) for _ in range(k)] + repeated
        n = len(repeated) // 2
        return words, range(k + n + 1, k + 2 * n)
