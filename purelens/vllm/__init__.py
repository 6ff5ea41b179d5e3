"""purelens on vLLM: interventions inside vLLM's engine, with the same `Record` as on HF.

Example (needs vLLM; see the README's vLLM section):

    llm = pl.vllm.load("path/to/model", dtype="float32", max_model_len=64)
    recs = pl.generate(llm, ["a prompt", "another"], [pl.save("h.1"), pl.add("h.0", v)],
                       max_new_tokens=8)
    recs[0]["h.1"]        # a tuple, one value per step of prompt 0, as pl.generate on HF
"""

from ._engine import load as load

__all__ = ["load"]
