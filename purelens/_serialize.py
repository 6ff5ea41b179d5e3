"""pl.dumps / pl.loads: interventions as bytes, with no code inside.

The bytes are a magic line, the length of a JSON header, the header, and the
tensors as one safetensors blob. The header holds the intervention tree:
each node is its builder's name and arguments; a tensor is a key into the
header's index of tensors (``"tensors"``: key -> dtype, offset, shape), and
the blob holds the tensors of each dtype one after another, flat, as one
tensor (safetensors' cost is per tensor: a record of a generation saves one
small tensor per step). Version 1 kept one safetensors entry per key and is
still read. A function is the name it is registered under (`pl.functions`), never
code. Loading rebuilds every node through its public builder, so that it is
checked as if written by hand. Nothing here calls pickle or eval.
"""

from __future__ import annotations

import dataclasses
import json
import math
import struct
from collections.abc import Callable
from typing import Any

from torch import Tensor

from . import _builders, _grads, functions, ops
from ._errors import PurelensError
from ._heads import head
from ._interventions import Intervention, describe, flatten_interventions
from ._positions import at
from ._select import is_int

__all__ = [
    "FORMAT_VERSION",
    "decode",
    "dumps",
    "encode",
    "interventions_only",
    "loads",
    "pack",
    "unpack",
]

FORMAT_VERSION = 2
_READS = (1, 2)
_UNDUMPABLE = (
    "cannot dump {what}: {error!r}. Tensors travel dense, on the CPU, in a dtype "
    "safetensors stores (floats, ints, bool, complex64)."
)
_MAX_DIM = 2**40  # a dimension of a tensor that is read
_MAX_HEADER = 16 * 2**20
_MAX_DEPTH = 64

_KINDS: dict[str, tuple[type, Any, tuple[str, ...]]] = {
    # kind: (node class, builder, the builder's positional fields)
    "save": (_builders.Save, _builders.save, ("site", "fn")),
    "patch": (_builders.Patch, _builders.patch, ("site", "fn")),
    "replace": (_builders.Replace, _builders.replace, ("site", "value")),
    "add": (_builders.Add, _builders.add, ("site", "delta")),
    "scale": (_builders.Scale, _builders.scale, ("site", "factor")),
    "ablate": (_builders.Ablate, _builders.ablate, ("site", "how")),
    "transplant": (_builders.Transplant, _builders.transplant, ("site",)),
    "stop": (_builders.Stop, _builders.stop, ("site",)),
    "skip": (_builders.Skip, _builders.skip, ("site", "fn")),
    "save_grad": (_grads.SaveGrad, _grads.save_grad, ("site",)),
    "patch_grad": (_grads.PatchGrad, _grads.patch_grad, ("site", "fn")),
}
_KIND_OF = {cls: kind for kind, (cls, _, _) in _KINDS.items()}
_DERIVED = {"takes_saved"}  # recomputed by the builder
_UNREGISTERED = (
    "{where} uses the function {fn!r}, which is not registered, and functions are not "
    "serialized as code.\n  Register it on both sides: @pl.functions.register('a.name'); "
    "or write it as an expression of purelens.ops (arithmetic, indexing, einops, where), "
    "or with built-in interventions (pl.add, pl.scale, pl.replace, pl.ablate, pl.at)."
)
_BAD = "cannot load interventions: {why}."
_Check = Callable[[], None]
_NOT_INTERVENTIONS = (
    "the data holds {value}, where interventions (in nested lists and tuples) were expected"
)


def dumps(interventions: Any) -> bytes:
    """Serialize an intervention, or nested lists and tuples of them, to bytes.

    Tensors are stored bitwise (safetensors); functions by their registered
    name. The format is versioned; `pl.loads` reads it back in the same
    structure (one intervention, a list, a tuple, nested).

    Raises:
        PurelensError: a value that is not an intervention (or a list or
            tuple of them), or a function that is not registered
            (`pl.functions`).

    Examples:
        >>> import torch, purelens as pl
        >>> ivs = [pl.save("h.0"), pl.add("h.1", torch.ones(4)), pl.ablate("h.2", "mean")]
        >>> data = pl.dumps(ivs)
        >>> ivs = pl.loads(data)
        >>> ivs[1].delta
        tensor([1., 1., 1., 1.])
        >>> pl.loads(pl.dumps(pl.save("h.0", torch.clone))).fn is torch.clone
        True
    """
    flatten_interventions(interventions)  # raises for anything else, naming it
    tensors: dict[str, Tensor] = {}
    return pack("interventions", {"tree": encode(interventions, tensors)}, tensors)


def loads(data: bytes) -> Any:
    """The interventions `pl.dumps` wrote, rebuilt through the public builders.

    Returns:
        What was dumped, in the same structure: one intervention, or nested
        lists and tuples of them.

    Raises:
        PurelensError: bytes that are not purelens interventions of a known
            version, a node or field that is not allowed, a function name
            that is not registered here, or data that is not interventions.

    Examples:
        >>> import purelens as pl
        >>> pl.loads(pl.dumps([pl.stop("h.1"), (pl.save("h.0", name="x"),)]))
        [stop(site='h.1'), (save(site='h.0', name='x'),)]
    """
    header, tensors = unpack(data, "interventions")
    return interventions_only(decode(header.get("tree"), tensors))


def interventions_only(tree: Any) -> Any:
    """`tree`, if it is an intervention or nested lists and tuples of them; else a PurelensError."""
    try:
        flatten_interventions(tree)
    except PurelensError:
        bad = _first_non_intervention(tree)
        raise PurelensError(_BAD.format(why=_NOT_INTERVENTIONS.format(value=_short(bad)))) from None
    return tree


def _first_non_intervention(tree: Any) -> Any:
    if isinstance(tree, list | tuple):
        for item in tree:
            if not isinstance(item, Intervention | list | tuple):
                return item
            bad = _first_non_intervention(item)
            if bad is not None:
                return bad
        return None
    return None if isinstance(tree, Intervention) else tree


# Container --------------------------------------------------------------------


def pack(kind: str, body: dict[str, Any], tensors: dict[str, Tensor]) -> bytes:
    """A magic line naming `kind`, the header's length, the JSON header, the tensors.

    The header is `body` with ``format`` (``purelens.<kind>``), ``version`` and
    ``tensors``, the index of the tensors (see the module docstring).
    """
    import torch

    index: dict[str, list[Any]] = {}
    by_dtype: dict[str, list[Tensor]] = {}
    offsets: dict[str, int] = {}
    for key, tensor in tensors.items():
        try:
            flat = tensor.detach().cpu().reshape(-1)
        except (RuntimeError, NotImplementedError) as error:  # sparse, meta, ...
            raise PurelensError(_UNDUMPABLE.format(what=describe(tensor), error=error)) from None
        name = str(flat.dtype).removeprefix("torch.")
        index[key] = [name, offsets.get(name, 0), list(tensor.shape)]
        offsets[name] = offsets.get(name, 0) + flat.numel()
        by_dtype.setdefault(name, []).append(flat)
    header = json.dumps(
        {"format": f"purelens.{kind}", "version": FORMAT_VERSION, **body, "tensors": index},
        allow_nan=False,
        separators=(",", ":"),
    ).encode()
    from safetensors.torch import save

    try:
        blob = save({name: torch.cat(parts) for name, parts in by_dtype.items()})
    except (KeyError, ValueError, RuntimeError) as error:  # dtypes safetensors lacks
        names = ", ".join(by_dtype)
        raise PurelensError(_UNDUMPABLE.format(what=f"tensors of {names}", error=error)) from None
    return _magic(kind) + struct.pack("<Q", len(header)) + header + blob


def unpack(data: Any, kind: str) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """The header and the tensors of bytes that `pack(kind, ...)` wrote; checked, never trusted."""

    def bad(why: str) -> PurelensError:
        return PurelensError(f"cannot load {kind}: {why}.")

    if not isinstance(data, bytes | bytearray | memoryview):
        raise bad(f"expected bytes, got {type(data).__name__}")
    data = bytes(data)
    magic = _magic(kind)
    if not data.startswith(magic) or len(data) < len(magic) + 8:
        raise bad(f"not purelens {kind} (no purelens header)")
    (size,) = struct.unpack("<Q", data[len(magic) : len(magic) + 8])
    start = len(magic) + 8
    if size > min(_MAX_HEADER, len(data) - start):
        raise bad(f"a header of {size} bytes does not fit")
    try:
        header = json.loads(data[start : start + size])
    except (ValueError, RecursionError) as e:
        raise bad(f"the header is not valid JSON ({e})") from None
    if not isinstance(header, dict) or header.get("format") != f"purelens.{kind}":
        raise bad(f"the header is not a purelens {kind} header")
    version = header.get("version")
    if type(version) is not int or version not in _READS:
        reads = " and ".join(map(str, _READS))
        raise bad(f"format version {version!r}; this purelens reads versions {reads}")
    from safetensors.torch import load

    try:
        blob = load(data[start + size :])
    except Exception as e:  # safetensors raises its own error types
        raise bad(f"the tensors are unreadable ({e})") from None
    if version == 1:
        return header, blob
    return header, _unflattened(header.pop("tensors", None), blob, bad)


def _unflattened(
    index: Any, blob: dict[str, Tensor], bad: Callable[[str], PurelensError]
) -> dict[str, Tensor]:
    """The tensors of a version-2 index (key -> dtype, offset, shape), each its own copy
    (a view would keep every tensor of its dtype alive)."""
    if not isinstance(index, dict):
        raise bad("the header has no index of its tensors")
    for name, flat in blob.items():
        if str(flat.dtype).removeprefix("torch.") != name or flat.ndim != 1:
            raise bad(f"the tensors of dtype {name!r} are not one flat {name} tensor")
    tensors: dict[str, Tensor] = {}
    taken = dict.fromkeys(blob, 0)  # elements read of each dtype: at most all of them
    sizes = {name: flat.numel() for name, flat in blob.items()}
    for key, entry in index.items():
        if not (
            type(entry) is list
            and len(entry) == 3
            and entry[0] in blob
            and type(entry[1]) is int
            and type(entry[2]) is list
            and len(entry[2]) <= 64
            and all(type(n) is int for n in entry[2])
            and (not entry[2] or (min(entry[2]) >= 0 and max(entry[2]) <= _MAX_DIM))
        ):
            raise bad(f"the index entry of tensor {_short(key)} is not [dtype, offset, shape]")
        name, offset, shape = entry
        count = math.prod(shape)
        size = sizes[name]
        taken[name] += count
        if offset < 0 or offset + count > size or taken[name] > size:
            raise bad(f"tensor {_short(key)} lies outside the {name} tensors")
        try:
            tensors[key] = blob[name][offset : offset + count].view(shape).clone()
        except RuntimeError as error:  # a shape torch cannot make
            raise bad(f"tensor {_short(key)} has a shape torch cannot make ({error})") from None
    return tensors


def _magic(kind: str) -> bytes:
    return f"purelens {kind}\n".encode()


# Encoding ---------------------------------------------------------------------


def encode(value: Any, tensors: dict[str, Tensor], where: str = "interventions") -> Any:
    """The JSON tree of interventions (and what they hold); tensors go into `tensors`."""
    return _encode(value, tensors, where)


def _encode(value: Any, tensors: dict[str, Tensor], where: str) -> Any:
    if isinstance(value, Intervention):
        kind = _KIND_OF.get(type(value))
        if kind is None:
            raise PurelensError(f"{value!r} cannot be serialized: not a built-in intervention.")
        fields = {
            f.name: _encode(getattr(value, f.name), tensors, repr(value))
            for f in dataclasses.fields(value)  # type: ignore[arg-type]
            if f.init and f.name not in _DERIVED
        }
        return {"node": kind, "fields": fields}
    if isinstance(value, list):
        return {"list": [_encode(v, tensors, where) for v in value]}
    if isinstance(value, tuple):
        return {"tuple": [_encode(v, tensors, where) for v in value]}
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        return {"float": repr(value)}  # also inf and nan, which JSON has no literal for
    if isinstance(value, Tensor):
        key = str(len(tensors))
        tensors[key] = value
        return {"tensor": key}
    if isinstance(value, slice):
        return {
            "slice": [_encode(v, tensors, where) for v in (value.start, value.stop, value.step)]
        }
    if isinstance(value, frozenset):
        return {"steps": sorted(value)}
    if isinstance(value, ops.Expr):
        fields = {
            f.name: _encode(getattr(value, f.name), tensors, where)
            for f in dataclasses.fields(value)  # type: ignore[arg-type]
        }
        return {"expr": ops.KIND_OF[type(value)], "fields": fields}
    if value is Ellipsis:
        return {"ellipsis": None}
    if isinstance(value, at):
        index = _encode(value.index, tensors, where)
        return {"at": {"index": index, "fn": _encode(value.fn, tensors, where)}}
    if isinstance(value, head):
        heads = _encode(value.h, tensors, where)
        return {"head": {"h": heads, "fn": _encode(value.fn, tensors, where)}}
    if callable(value):
        name = functions.name_of(value)
        if name is None:
            raise PurelensError(_UNREGISTERED.format(where=where, fn=value))
        return {"function": name}
    raise PurelensError(f"{where}: {value!r} cannot be serialized.")


# Decoding ---------------------------------------------------------------------


def decode(tree: Any, tensors: dict[str, Tensor], check: Callable[[], None] | None = None) -> Any:
    """What `encode` wrote, rebuilt through the public builders.

    Every value is checked for its type before it is used. `check`, if given,
    is called before each value is decoded: a server passes its deadline
    check, so that a slow decode is cut off as a slow run is.
    """
    return _decode(tree, tensors, 0, check or _unchecked)


def _unchecked() -> None:
    pass


def _decode(value: Any, tensors: dict[str, Tensor], depth: int, check: _Check) -> Any:
    check()
    if depth > _MAX_DEPTH:
        raise PurelensError(_BAD.format(why=f"nested deeper than {_MAX_DEPTH} levels"))
    if value is None or isinstance(value, bool | int | str):
        return value
    if not isinstance(value, dict) or len(value) not in (1, 2):
        raise PurelensError(_BAD.format(why=f"unexpected value {_short(value)}"))
    if set(value) == {"node", "fields"}:
        return _node(value["node"], value["fields"], tensors, depth, check)
    if set(value) == {"expr", "fields"}:
        return _expr(value["expr"], value["fields"], tensors, depth, check)
    if len(value) != 1:
        raise PurelensError(_BAD.format(why=f"unexpected value {_short(value)}"))
    ((tag, body),) = value.items()
    if tag in ("list", "tuple") and isinstance(body, list):
        items = [_decode(v, tensors, depth + 1, check) for v in body]
        return items if tag == "list" else tuple(items)
    if tag == "float" and isinstance(body, str) and len(body) <= 32:
        try:
            return float(body)
        except ValueError:
            pass
    if tag == "tensor" and isinstance(body, str):
        if body not in tensors:
            raise PurelensError(_BAD.format(why=f"tensor {body!r} is missing"))
        return tensors[body]
    if tag == "slice" and isinstance(body, list) and len(body) == 3:
        parts = [_decode(v, tensors, depth + 1, check) for v in body]
        if all(p is None or (isinstance(p, int) and not isinstance(p, bool)) for p in parts):
            return slice(*parts)
    if tag == "steps" and isinstance(body, list) and all(is_int(s) for s in body):
        return frozenset(body)
    if tag == "at" and isinstance(body, dict) and set(body) == {"index", "fn"}:
        index = _decode(body["index"], tensors, depth + 1, check)
        fn = _decode(body["fn"], tensors, depth + 1, check)
        if (is_int(index) or isinstance(index, Tensor)) and (fn is None or callable(fn)):
            return at(index, fn)
    if tag == "head" and isinstance(body, dict) and set(body) == {"h", "fn"}:
        heads = _decode(body["h"], tensors, depth + 1, check)
        fn = _decode(body["fn"], tensors, depth + 1, check)
        if fn is None or callable(fn):
            return head(heads, fn)  # checks `heads`
    if tag == "ellipsis" and body is None:
        return Ellipsis
    if tag == "function" and isinstance(body, str):
        return functions.get(body)
    raise PurelensError(_BAD.format(why=f"{tag!r} with {_short(body)} is not allowed"))


def _node(
    kind: Any, fields: Any, tensors: dict[str, Tensor], depth: int, check: _Check
) -> Intervention:
    if not isinstance(kind, str) or kind not in _KINDS:
        allowed = ", ".join(sorted(_KINDS))
        raise PurelensError(
            _BAD.format(why=f"unknown intervention {_short(kind)} (known: {allowed})")
        )
    cls, builder, positional = _KINDS[kind]
    names = {f.name for f in dataclasses.fields(cls) if f.init and f.name not in _DERIVED}
    if not isinstance(fields, dict) or not set(fields) <= names or "site" not in fields:
        why = f"the fields of {kind!r} must be among {sorted(names)}, with 'site'"
        raise PurelensError(_BAD.format(why=why))
    values = {k: _decode(v, tensors, depth + 1, check) for k, v in fields.items()}
    # The builder checks every value's type (rows are ints or lists of ints, ...): nothing
    # here converts a value first, since converting is using (`list()` of an expression,
    # which has `__getitem__`, never ends).
    args = [values.pop(name) for name in positional if name in values]
    try:
        node: Intervention = builder(*args, **values)
    except TypeError as e:
        raise PurelensError(_BAD.format(why=f"bad arguments for {kind!r} ({e})")) from None
    return node


def _expr(
    kind: Any, fields: Any, tensors: dict[str, Tensor], depth: int, check: _Check
) -> ops.Expr:
    if not isinstance(kind, str) or kind not in ops.EXPRESSIONS:
        known = ", ".join(sorted(ops.EXPRESSIONS))
        raise PurelensError(_BAD.format(why=f"unknown expression {_short(kind)} (known: {known})"))
    cls = ops.EXPRESSIONS[kind]
    names = {f.name for f in dataclasses.fields(cls)}
    if not isinstance(fields, dict) or not set(fields) <= names:
        raise PurelensError(
            _BAD.format(why=f"the fields of {kind!r} must be among {sorted(names)}")
        )
    values = {k: _decode(v, tensors, depth + 1, check) for k, v in fields.items()}
    for name in ("a", "b", "mask"):
        if name in values and not isinstance(values[name], ops.Expr):
            raise PurelensError(_BAD.format(why=f"{kind!r}.{name} must be an expression"))
    axes = values.get("axes", ())
    if not isinstance(axes, tuple) or not all(isinstance(a, tuple) and len(a) == 2 for a in axes):
        raise PurelensError(_BAD.format(why="einops axes are (name, size) pairs"))
    try:
        expr: ops.Expr = cls(**values)
    except TypeError as e:
        raise PurelensError(_BAD.format(why=f"bad fields for {kind!r} ({e})")) from None
    return ops.check_size(expr)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
