"""Sites: parsing, resolution by exact path, suffix, negative index and root."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import purelens as pl
from tests.helpers import TinyMLP


class Nested(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.ModuleDict({"blocks": nn.ModuleList([nn.Linear(2, 2) for _ in range(3)])})
        self.decoder = nn.ModuleDict({"blocks": nn.ModuleList([nn.Linear(2, 2) for _ in range(2)])})
        self.head = nn.Linear(2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.encoder["blocks"]:
            x = block(x)
        for block in self.decoder["blocks"]:
            x = block(x)
        return self.head(x)


def saved_module_output(model: nn.Module, site: str, name: str) -> bool:
    """Whether saving `site` gives the output of module `name` (checked with a raw hook)."""
    x = torch.randn(3, 4 if isinstance(model, TinyMLP) else 2)
    seen = {}
    handle = model.get_submodule(name).register_forward_hook(
        lambda m, a, o: seen.setdefault("o", o)
    )
    try:
        rec = pl.run(model, x, [pl.save(site)])
    finally:
        handle.remove()
    return torch.equal(rec[site], seen["o"])


def test_exact_path_and_suffix(mlp: TinyMLP) -> None:
    assert saved_module_output(mlp, "layers.0", "layers.0")
    assert saved_module_output(mlp, "0", "layers.0")
    assert saved_module_output(mlp, "2", "layers.2")


def test_negative_index_counts_from_the_end() -> None:
    model = Nested()
    assert saved_module_output(model, "encoder.blocks.-1", "encoder.blocks.2")
    assert saved_module_output(model, "decoder.blocks.-2", "decoder.blocks.0")
    mlp = TinyMLP()
    assert saved_module_output(mlp, "layers.-1", "layers.2")
    assert saved_module_output(mlp, "-3", "layers.0")


def test_root_is_the_empty_path(mlp: TinyMLP) -> None:
    x = torch.randn(2, 4)
    rec = pl.run(mlp, x, [pl.save(""), pl.save(":input", name="in")])
    assert torch.equal(rec[""], mlp(x))
    assert torch.equal(rec["in"], x)


def test_input_port_is_the_first_positional_tensor(mlp: TinyMLP) -> None:
    x = torch.randn(2, 4)
    rec = pl.run(mlp, x, [pl.save("layers.1:input"), pl.save("layers.0:output")])
    assert torch.equal(rec["layers.1:input"], rec["layers.0:output"])


def test_ambiguous_suffix_names_the_matches() -> None:
    with pytest.raises(pl.SiteError) as info:
        pl.run(Nested(), torch.randn(1, 2), [pl.save("blocks.0")])
    message = str(info.value)
    assert "'blocks.0'" in message and "ambiguous" in message
    assert "encoder.blocks.0" in message and "decoder.blocks.0" in message


def test_unknown_site_lists_the_closest_paths(mlp: TinyMLP) -> None:
    with pytest.raises(pl.SiteError) as info:
        pl.run(mlp, torch.randn(1, 4), [pl.save("layer.0")])
    message = str(info.value)
    assert "'layer.0'" in message and "TinyMLP" in message
    assert "'layers.0'" in message
    assert isinstance(info.value, pl.PurelensError)


def test_out_of_range_negative_index_is_unknown(mlp: TinyMLP) -> None:
    with pytest.raises(pl.SiteError, match="matches no module"):
        pl.run(mlp, torch.randn(1, 4), [pl.save("layers.-4")])


def test_bad_port_is_rejected_when_built() -> None:
    with pytest.raises(pl.SiteError, match="port 'outptu'"):
        pl.save("h.0:outptu")
    with pytest.raises(pl.SiteError, match="a site is a string"):
        pl.save(3)  # type: ignore[arg-type]


def test_sites_lists_every_module_path(mlp: TinyMLP) -> None:
    assert pl.sites(mlp) == ["", "layers", "layers.0", "layers.1", "layers.2"]
    assert pl.sites(Nested())[:3] == ["", "encoder", "encoder.blocks"]


def test_resolution_follows_a_changed_module_tree(mlp: TinyMLP) -> None:
    x = torch.randn(2, 4)
    pl.run(mlp, x, [pl.save("2")])  # cached: "2" -> layers.2
    mlp.layers = nn.Sequential(nn.Linear(4, 3))  # layers.2 is gone
    with pytest.raises(pl.SiteError):
        pl.run(mlp, x, [pl.save("2")])
    assert torch.equal(pl.run(mlp, x, [pl.save("0")])["0"], mlp(x))


def test_a_replaced_submodule_is_the_one_hooked(mlp: TinyMLP) -> None:
    x = torch.randn(2, 4)
    pl.run(mlp, x, [pl.save("1")])
    mlp.layers[1] = nn.ReLU()
    assert torch.equal(pl.run(mlp, x, [pl.save("1")])["1"], torch.relu(mlp.layers[0](x)))


def test_a_module_added_after_the_first_run_is_found(mlp: TinyMLP) -> None:
    x = torch.randn(2, 4)
    pl.run(mlp, x, [pl.save("1")])

    class WithExtra(nn.Module):
        def __init__(self, inner: nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, v: torch.Tensor) -> torch.Tensor:
            return self.inner(v) + 1

    mlp.layers[1] = WithExtra(nn.Tanh())
    rec = pl.run(mlp, x, [pl.save("1.inner")])
    assert torch.equal(rec["1.inner"], torch.tanh(mlp.layers[0](x)))


def test_a_cached_negative_index_follows_an_appended_block() -> None:
    # Issue 13, item 10: after net.blocks.append(...), "blocks.-1" still meant the old last block.
    model = Nested()
    x = torch.randn(2, 2)
    pl.run(model, x, [pl.save("encoder.blocks.-1")])  # cached: -> encoder.blocks.2
    model.encoder["blocks"].append(nn.Linear(2, 2))
    assert saved_module_output(model, "encoder.blocks.-1", "encoder.blocks.3")
    del model.encoder["blocks"][3]  # removals fire no registration hook
    assert saved_module_output(model, "encoder.blocks.-1", "encoder.blocks.2")
    model.encoder["blocks"].insert(3, nn.Linear(2, 2))  # nor does insert
    assert saved_module_output(model, "encoder.blocks.-1", "encoder.blocks.3")


def test_a_cached_suffix_that_became_ambiguous_is_refused() -> None:
    # Issue 13, item 10: a unique suffix, cached, stayed resolved after a second match appeared.
    model = Nested()
    x = torch.randn(2, 2)
    pl.run(model, x, [pl.save("blocks.2")])  # unique: -> encoder.blocks.2
    model.decoder["blocks"].append(nn.Linear(2, 2))  # now also decoder.blocks.2
    with pytest.raises(pl.SiteError, match="ambiguous"):
        pl.run(model, x, [pl.save("blocks.2")])


def test_a_container_site_says_it_is_a_container() -> None:
    model = Nested()
    with pytest.raises(pl.SiteError, match=r"(?s)a ModuleList: a container .*'encoder\.blocks\.0'"):
        pl.run(model, torch.randn(1, 2), [pl.save("encoder.blocks")])


def test_a_module_object_as_site_names_its_path() -> None:
    model = Nested()
    pl.run(model, torch.randn(1, 2), [pl.save("head")])  # purelens has seen the model
    with pytest.raises(pl.SiteError) as info:
        pl.save(model.encoder["blocks"][1])  # type: ignore[arg-type]
    message = str(info.value)
    assert "'encoder.blocks.1'" in message and "in Nested" in message
    assert "Linear(" not in message  # not the module's whole repr


@pytest.mark.parametrize(
    ("site", "match"),
    [
        (["0"], r"one intervention names one site"),
        (None, r"a site is a string"),
        (b"0", r"a site is a string"),
    ],
)
def test_a_site_that_is_not_a_string_is_a_site_error(site: object, match: str) -> None:
    # Issue 13, item 23: pl.save(["0"]) raised TypeError: unhashable type.
    with pytest.raises(pl.SiteError, match=match):
        pl.save(site)  # type: ignore[arg-type]


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")
def test_a_torchscript_site_is_refused_with_the_reason() -> None:
    # Issue 13, item 23: torch's raw hook error.
    model = nn.Sequential(nn.Linear(2, 2), torch.jit.script(nn.Linear(2, 2)))
    with pytest.raises(pl.SiteError, match="TorchScript"):
        pl.run(model, torch.randn(1, 2), [pl.save("1")])


def test_a_module_list_insert_that_makes_a_suffix_ambiguous_is_seen() -> None:
    # ModuleList.insert (and Sequential's) writes its children directly: no registration
    # hook sees it, so a suffix site cached before resolved to the old module silently.
    class Holder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.ModuleList([nn.Linear(2, 2)])

    class Two(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.p = Holder()
            self.b = nn.ModuleList([nn.Linear(2, 2)])

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.b[-1](self.p.a[0](x))

    model = Two()
    extra = Holder()  # built before: its hooks fired before the site was cached
    x = torch.ones(1, 2)
    for _ in range(2):  # cached: the suffix "a.0" matches "p.a.0" only
        pl.run(model, x, [pl.save("a.0")])
    model.b.insert(0, extra)  # "b.0.a.0" ends in "a.0" too now
    with pytest.raises(pl.SiteError, match="ambiguous"):
        pl.run(model, x, [pl.save("a.0")])
