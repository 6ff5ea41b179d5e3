"""pl.dumps / pl.loads: every built-in intervention round-trips exactly; no code travels."""

from __future__ import annotations

import dataclasses
import json
import struct
import time
from collections.abc import Callable

import optree
import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

import purelens as pl
from tests.helpers import TinyMLP


@pl.functions.register("tests.negate")
def negate(v: torch.Tensor) -> torch.Tensor:
    return -v


@pl.functions.register("tests.from_saved")
def from_saved(v: torch.Tensor, saved: object) -> torch.Tensor:
    return saved["layers.0"] * 0 + v  # type: ignore[index]


def every_kind() -> list[object]:
    g = torch.Generator().manual_seed(0)
    return [
        pl.save("layers.0"),
        pl.save("layers.1", negate, name="neg", step=slice(1, None, 2), batch=[0, -1]),
        pl.patch("layers.1", from_saved, step={0, 2}),
        pl.patch("layers.1", pl.at(torch.tensor([0, 1]), negate)),
        pl.save("layers.1", pl.at(-1), name="last"),
        pl.replace("layers.0", torch.randn(8, generator=g, dtype=torch.float64), batch=0),
        pl.add("layers.0", torch.randn(2, 8, generator=g).half()),
        pl.scale("layers.0", 0.5),
        pl.scale("layers.2", float("inf"), step=3),
        pl.ablate("layers.1", "mean", batch=slice(0, 2)),
        pl.transplant("layers.0", src=0, dst=[1, 2]),
        pl.stop("layers.2"),
        pl.skip("layers.1", negate),
        pl.save_grad("layers.0", name="g"),
        pl.patch_grad("layers.0", negate),
        (pl.add("layers.2", torch.tensor(1)), [pl.ablate("layers.0")]),
    ]


def same(a: object, b: object) -> bool:
    la, da = optree.tree_flatten(a, namespace="purelens")
    lb, db = optree.tree_flatten(b, namespace="purelens")
    if da != db or len(la) != len(lb):
        return False
    return all(
        torch.equal(x, y) and x.dtype == y.dtype if isinstance(x, torch.Tensor) else x == y
        for x, y in zip(la, lb, strict=True)
    )


def test_every_builtin_intervention_round_trips_exactly() -> None:
    ivs = every_kind()
    back = pl.loads(pl.dumps(ivs))
    assert same(back, ivs)
    assert back[1].fn is negate and back[2].takes_saved
    assert back[6].delta.dtype == torch.float16


def test_loaded_interventions_act_the_same() -> None:
    model, x = TinyMLP(), torch.randn(3, 4)
    ivs = [pl.save("layers.0"), pl.patch("layers.1", from_saved), pl.add("layers.2", torch.ones(3))]
    want = pl.run(model, x, ivs)
    got = pl.run(model, x, pl.loads(pl.dumps(ivs)))
    assert torch.equal(got.output, want.output) and torch.equal(got["layers.0"], want["layers.0"])


def test_unregistered_functions_are_refused_with_the_way_out() -> None:
    with pytest.raises(pl.PurelensError, match=r"(?s)not registered.*pl\.functions\.register"):
        pl.dumps([pl.patch("layers.0", lambda v: v * 2)])


def test_names_are_checked() -> None:
    with pytest.raises(pl.PurelensError, match="already registered"):
        pl.functions.register("tests.negate")(lambda v: v)
    with pytest.raises(pl.PurelensError, match="function name"):
        pl.functions.register("import os")
    pl.functions.register("tests.negate")(negate)  # the same function again is fine
    assert "tests.negate" in pl.functions.names()


def forge(tree: object, version: int = 1, blob: bytes | None = None, index: object = None) -> bytes:
    from safetensors.torch import save

    fields = {"format": "purelens.interventions", "version": version, "tree": tree}
    if index is not None:
        fields["tensors"] = index
    header = json.dumps(fields)
    data = header.encode()
    body = blob if blob is not None else save({"0": torch.zeros(2)})
    return b"purelens interventions\n" + struct.pack("<Q", len(data)) + data + body


def _v2(index: object, blob: dict[str, torch.Tensor] | None = None) -> bytes:
    """Version-2 bytes of no interventions with `index` and a blob (two float32 zeros)."""
    from safetensors.torch import save

    tensors = {"float32": torch.zeros(2)} if blob is None else blob
    return forge({"list": []}, version=2, blob=save(tensors), index=index)


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\x80\x04pickle",
        forge({"list": []}, version=99),
        forge({"list": []}, version="2"),
        _v2(None),  # no index of its tensors
        _v2([]),
        _v2({"0": ["float32", 0, [3]]}),  # past the end
        _v2({"0": ["float32", 1, [2]]}),
        _v2({"0": ["float32", -1, [1]]}),
        _v2({"0": ["float32", 0, [-2]]}),
        _v2({"0": ["float32", 0, 2]}),
        _v2({"0": ["float32", 0.0, [2]]}),
        _v2({"0": ["float32", 0]}),
        _v2({"0": ["int64", 0, [1]]}),  # no such dtype in the blob
        _v2({"0": ["float32", 0, [2]]}, {"float32": torch.zeros(2, 1)}),  # not flat
        _v2({"0": ["float32", 0, [2]]}, {"float32": torch.zeros(2, dtype=torch.int64)}),
        forge({"list": [{"node": "exec", "fields": {"site": "x"}}]}),
        forge({"list": [{"node": "save", "fields": {"site": "a", "code": "print(1)"}}]}),
        forge(
            {"list": [{"node": "patch", "fields": {"site": "a", "fn": {"function": "os.system"}}}]}
        ),
        forge({"list": [{"node": "patch", "fields": {"site": "a", "fn": {"eval": "1+1"}}}]}),
        forge({"list": [{"node": "add", "fields": {"site": "a", "delta": {"tensor": "9"}}}]}),
        forge({"list": [{"node": "save", "fields": {"site": 3}}]}),
        forge({"tensor": "0"}),
        forge({"list": [{"node": "save", "fields": {"site": "a"}}, 3]}),
        forge({"tuple": [{"list": ["h.0"]}]}),
        forge(json.loads("[" * 50 + "]" * 50)),
        forge({"list": [{"list": []}] * 2}, blob=b"not safetensors"),
    ],
)
def test_hostile_or_broken_bytes_are_refused_cleanly(data: bytes) -> None:
    with pytest.raises(pl.PurelensError):
        pl.loads(data)


def test_a_hand_written_payload_loads() -> None:
    tree = {"list": [{"tuple": []}, {"node": "scale", "fields": {"site": "a", "factor": 2}}]}
    assert pl.loads(forge(tree)) == [(), pl.scale("a", 2)]


def test_deep_nesting_is_refused() -> None:
    tree: object = {"list": []}
    for _ in range(200):
        tree = {"list": [tree]}
    with pytest.raises(pl.PurelensError, match="nested deeper"):
        pl.loads(forge(tree))


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300))
def test_random_bytes_never_crash_otherwise(data: bytes) -> None:
    for payload in (data, b"purelens interventions\n" + data):
        try:
            pl.loads(payload)
        except pl.PurelensError:
            pass


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=12,
)


@settings(max_examples=200, deadline=None)
@given(json_values)
def test_random_headers_load_or_raise_purelens_errors(tree: object) -> None:
    try:
        pl.loads(forge(tree))
    except pl.PurelensError:
        pass


def test_loading_never_unpickles_or_evaluates(monkeypatch: pytest.MonkeyPatch) -> None:
    import builtins
    import pickle

    data = pl.dumps(every_kind())

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("called")

    for module, name in (
        (pickle, "loads"),
        (pickle, "load"),
        (builtins, "eval"),
        (builtins, "exec"),
    ):
        monkeypatch.setattr(module, name, refuse)
    assert same(pl.loads(data), every_kind())


@pytest.mark.parametrize(
    "ivs",
    [
        pl.save("h.0"),
        (pl.save("h.0"), pl.add("h.1", torch.ones(2))),
        [pl.stop("h.1"), (pl.save("h.0"), [pl.ablate("h.2")]), ()],
        [],
    ],
)
def test_loads_gives_back_what_dumps_was_given(ivs: object) -> None:
    back = pl.loads(pl.dumps(ivs))
    assert type(back) is type(ivs) and same(back, ivs)


@pytest.mark.parametrize(
    "value", [torch.ones(2), "h.0", [pl.save("h.0"), 3], {"a": pl.save("h.0")}]
)
def test_dumps_refuses_what_is_not_interventions(value: object) -> None:
    with pytest.raises(pl.PurelensError, match="interventions"):
        pl.dumps(value)


def transplant_rows(src: object, dst: object = None) -> bytes:
    fields = {"site": "a", "src": src}
    if dst is not None:
        fields["dst"] = dst
    return forge({"list": [{"node": "transplant", "fields": fields}]})


@pytest.mark.parametrize(
    "data",
    [
        transplant_rows({"expr": "value", "fields": {}}, {"list": [1]}),
        transplant_rows(0, {"expr": "index", "fields": {"a": {"expr": "value", "fields": {}}}}),
        transplant_rows("01", {"list": [1]}),
        transplant_rows(3),
        transplant_rows({"float": "1.5"}, {"list": [1]}),
        transplant_rows(None, {"list": [1]}),
        transplant_rows({"slice": [0, 1, None]}, {"list": [1]}),
    ],
)
def test_transplant_rows_of_the_wrong_type_are_refused(data: bytes) -> None:
    # An expression as rows once iterated forever (it has `__getitem__`); others were TypeErrors.
    with pytest.raises(pl.PurelensError):
        pl.loads(data)


def test_transplant_rows_round_trip() -> None:
    for iv in (pl.transplant("a", src=0, dst=[1, 2]), pl.transplant("a", src=[1], dst=0)):
        assert pl.loads(pl.dumps(iv)) == iv


def test_torch_functions_for_interventions_travel_by_their_torch_names() -> None:
    ivs = [
        pl.save("layers.0", torch.clone),
        pl.patch("layers.1", torch.zeros_like),
        pl.patch("layers.2", torch.ones_like),
        pl.skip("layers.1", torch.neg),
        pl.patch_grad("layers.0", torch.abs),
    ]
    back = pl.loads(pl.dumps(ivs))
    assert [iv.fn for iv in back] == [iv.fn for iv in ivs]
    assert "torch.clone" in pl.functions.names()


def test_an_unknown_function_name_says_how_to_register_it_on_a_server() -> None:
    data = forge({"list": [{"node": "patch", "fields": {"site": "a", "fn": {"function": "x.y"}}}]})
    with pytest.raises(pl.PurelensError, match=r"(?s)'x\.y'.*purelens serve --import MODULE"):
        pl.loads(data)


# Decoding requests: only PurelensErrors, and never for long ------------------------------


class TooSlow(Exception):
    """Raised by the decoder's `check` once the time given to a decode is over."""


def within(seconds: float) -> Callable[[], None]:
    end = time.monotonic() + seconds

    def check() -> None:
        if time.monotonic() > end:
            raise TooSlow

    return check


def forge_request(interventions: object, inputs: object) -> bytes:
    from safetensors.torch import save

    header = {
        "format": "purelens.request",
        "version": 1,
        "call": "run",
        "interventions": interventions,
        "inputs": inputs,
        "kwargs": {"dict": [["attention_mask", inputs]]},
    }
    data = json.dumps(header).encode()
    return b"purelens request\n" + struct.pack("<Q", len(data)) + data + save({"0": torch.zeros(2)})


def _nodes(inner: st.SearchStrategy[object]) -> st.SearchStrategy[object]:
    from purelens import _builders, _grads, ops

    kinds = {
        "save": _builders.Save,
        "patch": _builders.Patch,
        "add": _builders.Add,
        "scale": _builders.Scale,
        "ablate": _builders.Ablate,
        "transplant": _builders.Transplant,
        "skip": _builders.Skip,
        "patch_grad": _grads.PatchGrad,
    }
    tags = ["list", "tuple", "float", "tensor", "slice", "steps", "at", "function", "ellipsis"]

    def node(kind: str) -> st.SearchStrategy[object]:
        names = sorted(f.name for f in dataclasses.fields(kinds[kind]))
        fields = st.dictionaries(st.sampled_from(names), inner, max_size=4)
        return fields.map(lambda f: {"node": kind, "fields": {"site": "h.0", **f}})

    def expr(kind: str) -> st.SearchStrategy[object]:
        names = sorted(f.name for f in dataclasses.fields(ops.EXPRESSIONS[kind]))
        fields = st.dictionaries(st.sampled_from(names or ["a"]), inner, max_size=3)
        return fields.map(lambda f: {"expr": kind, "fields": f})

    return st.one_of(
        st.sampled_from(sorted(kinds)).flatmap(node),
        st.sampled_from(sorted(ops.EXPRESSIONS)).flatmap(expr),
        st.builds(lambda tag, body: {tag: body}, st.sampled_from(tags), inner),
        st.lists(inner, max_size=3).map(lambda items: {"list": items}),
    )


request_trees = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-3, 3)
    | st.sampled_from(["h.0", "0", "x.y", "mean", "sum", "b s d -> b", "add"])
    | st.just({"tensor": "0"})
    | st.just({"float": "1.5"})
    | st.just({"expr": "value", "fields": {}}),
    _nodes,
    max_leaves=16,
)


@settings(max_examples=300, deadline=None)
@given(request_trees, request_trees)
@example(
    {"list": [{"node": "transplant", "fields": {"site": "h.0", "src": {"expr": "value"}}}]},
    None,
)
@example(
    {
        "list": [
            {
                "node": "transplant",
                "fields": {"site": "h.0", "src": {"expr": "value", "fields": {}}, "dst": 1},
            }
        ]
    },
    {"list": [1, 2]},
)
def test_random_request_headers_decode_or_raise_purelens_errors_quickly(
    interventions: object, inputs: object
) -> None:
    from purelens import _wire

    data = forge_request(interventions, inputs)
    try:
        _wire.decode_request(data, check=within(2.0))
    except pl.PurelensError:
        pass
    try:
        pl.loads(forge(interventions))
    except pl.PurelensError:
        pass


_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.bool]


@settings(max_examples=40, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(_DTYPES),
            st.lists(st.integers(0, 3), max_size=3),
            st.booleans(),
        ),
        max_size=6,
    )
)
def test_tensors_of_any_dtype_and_shape_come_back_bitwise_and_apart(specs: list) -> None:
    # Version 2 lays the tensors of each dtype out one after another in one flat tensor.
    tensors = []
    for dtype, shape, transposed in specs:
        t = (torch.randn(shape) * 5).to(dtype)
        tensors.append(t.mT if transposed and t.ndim >= 2 else t)  # not contiguous
    back = pl.loads(pl.dumps([pl.replace("h.0", t) for t in tensors]))
    for t, iv in zip(tensors, back, strict=True):
        got = iv.value
        assert got.dtype == t.dtype and got.shape == t.shape
        assert torch.equal(got, t)
    storages = {iv.value.untyped_storage().data_ptr() for iv in back if iv.value.numel()}
    assert len(storages) == sum(1 for iv in back if iv.value.numel())  # each its own copy


def test_version_1_bytes_still_load() -> None:
    from safetensors.torch import save

    tree = {"list": [{"node": "add", "fields": {"site": "h.0", "delta": {"tensor": "0"}}}]}
    (iv,) = pl.loads(forge(tree, version=1, blob=save({"0": torch.arange(3.0)})))
    assert torch.equal(iv.delta, torch.arange(3.0))


def test_a_small_payload_cannot_make_large_tensors() -> None:
    from safetensors.torch import save

    blob = save({"float32": torch.zeros(1024)})
    index = {str(i): ["float32", 0, [1024]] for i in range(100)}  # all the same bytes
    data = forge({"list": []}, version=2, blob=blob, index=index)
    with pytest.raises(pl.PurelensError, match="outside"):
        pl.loads(data)


@pytest.mark.parametrize("shape", [[2**63, 0], [2**40, 2**40, 0], [0, 2**62]])
def test_shapes_torch_cannot_make_are_refused(shape: list[int]) -> None:
    with pytest.raises(pl.PurelensError):
        pl.loads(_v2({"0": ["float32", 0, shape]}))


@pytest.mark.parametrize(
    "tensor",
    [
        torch.zeros(2, dtype=torch.complex128),
        torch.zeros(2, device="meta"),
        torch.zeros(2, 2).to_sparse(),
    ],
)
def test_tensors_that_cannot_travel_are_refused_on_dumping(tensor: torch.Tensor) -> None:
    with pytest.raises(pl.PurelensError, match="cannot dump"):
        pl.dumps([pl.replace("h.0", tensor)])
