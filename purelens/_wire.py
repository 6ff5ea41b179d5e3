"""What travels between `pl.remote` and `purelens serve`: requests and records as bytes.

Both use the container of `pl.dumps` (a magic line, a JSON header, one
safetensors blob). A request holds the call (``run`` or ``generate``), the
inputs and keyword arguments as *values* (tensors, numbers, strings, lists,
dicts), the interventions and the loss as `pl.dumps` writes them (so
functions are registered names or `purelens.ops` expressions, never code).
A record holds the saved values, the output, the gradients and the loss.
Reading either builds nothing but tensors, containers, interventions through
their builders, and (on the client only) HF model-output classes.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable, Mapping
from typing import Any

from torch import Tensor

from . import _serialize
from ._errors import PurelensError
from ._record import Record

__all__ = [
    "Request",
    "decode_record",
    "decode_request",
    "decode_result",
    "encode_record",
    "encode_records",
    "encode_request",
    "saved_bytes",
]

CALLS = ("run", "generate")
_MAX_DEPTH = 64
# Model-output classes a record may name: the modules transformers defines them in.
_OUTPUT_MODULES = ("transformers.modeling_outputs", "transformers.generation.utils")
_BAD_OUTPUT = "bad value: the model output {cls} cannot be rebuilt from its fields ({error})."


@dataclasses.dataclass(frozen=True)
class Request:
    """A decoded request: what to call, on what, with which interventions."""

    call: str
    inputs: Any
    interventions: list[Any]
    loss: Any = None
    kwargs: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    validate: bool = False


def encode_request(request: Request) -> bytes:
    """Bytes for the server; a function that is not data raises here, on the client.

    Raises:
        PurelensError: a lambda or other unregistered function (anywhere in
            the interventions or the loss), or a value that is not data.
    """
    tensors: dict[str, Tensor] = {}
    body = {
        "call": request.call,
        "inputs": _encode_value(request.inputs, tensors, "inputs"),
        "interventions": _serialize.encode(list(request.interventions), tensors),
        "loss": None if request.loss is None else _serialize.encode(request.loss, tensors, "loss"),
        "kwargs": _encode_value(dict(request.kwargs), tensors, "keyword arguments"),
        "validate": bool(request.validate),
    }
    return _serialize.pack("request", body, tensors)


def decode_request(data: bytes, check: Callable[[], None] | None = None) -> Request:
    """The request in `data`, checked field by field.

    Args:
        data: the request's bytes.
        check: called before each value is decoded (a server passes its
            deadline check, so that the time limit covers decoding too).

    Raises:
        PurelensError: anything that is not a well-formed request.
    """
    check = check or _unchecked
    header, tensors = _serialize.unpack(data, "request")
    known = {"format", "version", "call", "inputs", "interventions", "loss", "kwargs", "validate"}
    if not set(header) <= known:
        raise PurelensError(f"bad request: unknown fields {sorted(set(header) - known)}.")
    call = header.get("call")
    if call not in CALLS:
        raise PurelensError(f"bad request: `call` must be one of {CALLS}, got {call!r}.")
    interventions = _serialize.decode(header.get("interventions", {"list": []}), tensors, check)
    if not isinstance(interventions, list):
        raise PurelensError("bad request: `interventions` must be a list.")
    _serialize.interventions_only(interventions)
    loss = header.get("loss")
    if loss is not None:
        loss = _serialize.decode(loss, tensors, check)
        if not callable(loss):
            raise PurelensError(
                "bad request: `loss` must be a registered function or a purelens.ops expression."
            )
    kwargs = _decode_value(header.get("kwargs", {"dict": []}), tensors, 0, False, check)
    if not isinstance(kwargs, dict):
        raise PurelensError("bad request: `kwargs` must be a mapping.")
    validate = header.get("validate", False)
    if not isinstance(validate, bool):
        raise PurelensError("bad request: `validate` must be true or false.")
    inputs = _decode_value(header.get("inputs"), tensors, 0, False, check)
    return Request(call, inputs, interventions, loss, kwargs, validate)


def encode_record(record: Record) -> bytes:
    """A record as bytes: saved values, output, gradients and loss."""
    tensors: dict[str, Tensor] = {}
    return _serialize.pack("record", _record_body(record, tensors), tensors)


def encode_records(records: list[Record]) -> bytes:
    """Several records as bytes (a vLLM engine's call: one record per prompt)."""
    tensors: dict[str, Tensor] = {}
    body = {"records": [_record_body(record, tensors) for record in records]}
    return _serialize.pack("records", body, tensors)


def _record_body(record: Record, tensors: dict[str, Tensor]) -> dict[str, Any]:
    return {
        "saved": _encode_value(dict(record), tensors, "saved values"),
        "output": _encode_value(record.output, tensors, "the output"),
        "grads": _encode_value(dict(record.grads), tensors, "gradients"),
        "loss": _encode_value(record.loss, tensors, "the loss"),
    }


def decode_record(data: bytes) -> Record:
    """The `Record` in `data`, with HF model outputs rebuilt as their own classes.

    Raises:
        PurelensError: anything that is not a well-formed record.
    """
    header, tensors = _serialize.unpack(data, "record")
    return _record_of(header, tensors)


def decode_result(data: bytes) -> Record | list[Record]:
    """What a server answered: one `Record`, or a list of them (`encode_records`)."""
    if not bytes(data).startswith(_serialize._magic("records")):
        return decode_record(data)
    header, tensors = _serialize.unpack(data, "records")
    bodies = header.get("records")
    if not isinstance(bodies, list) or not all(isinstance(b, dict) for b in bodies):
        raise PurelensError("cannot load records: `records` must be a list of records.")
    return [_record_of(body, tensors) for body in bodies]


def _record_of(header: dict[str, Any], tensors: dict[str, Tensor]) -> Record:
    parts = {
        key: _decode_value(header.get(key), tensors, 0, True, _unchecked)
        for key in ("saved", "output", "grads", "loss")
    }
    if not isinstance(parts["saved"], dict) or not isinstance(parts["grads"], dict):
        raise PurelensError("cannot load record: saved values and gradients must be mappings.")
    return Record(parts["saved"], parts["output"], parts["grads"], parts["loss"])


def saved_bytes(record: Record) -> int:
    """How many bytes of tensors a record holds (its output included)."""
    import torch.utils._pytree as torch_pytree

    leaves = torch_pytree.tree_leaves((dict(record), record.output, dict(record.grads)))
    return sum(t.numel() * t.element_size() for t in leaves if isinstance(t, Tensor))


# Values -----------------------------------------------------------------------


def _encode_value(value: Any, tensors: dict[str, Tensor], where: str) -> Any:
    if isinstance(value, Tensor):  # (first: a record is mostly tensors)
        key = str(len(tensors))
        tensors[key] = value
        return {"tensor": key}
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        return {"float": repr(value)}
    if isinstance(value, list | tuple):  # (a model output is a mapping, never one of these)
        tag = "list" if isinstance(value, list) else "tuple"
        return {tag: [_encode_value(v, tensors, where) for v in value]}
    if _is_model_output(value):
        cls = type(value)
        fields = {k: _encode_value(v, tensors, where) for k, v in value.items()}
        return {"model_output": [cls.__module__, cls.__qualname__], "fields": fields}
    if isinstance(value, Mapping):
        if not all(isinstance(k, str) for k in value):
            raise PurelensError(f"{where}: only mappings with string keys travel, got {value!r}.")
        return {"dict": [[k, _encode_value(v, tensors, where)] for k, v in value.items()]}
    if _is_cache(value):
        return None  # a KV cache does not travel; see the README
    raise PurelensError(
        f"{where}: {type(value).__name__} cannot be sent to or from a server; "
        "values are tensors, numbers, strings, and lists, tuples and dicts of them."
    )


def _unchecked() -> None:
    pass


def _decode_value(
    value: Any, tensors: dict[str, Tensor], depth: int, outputs: bool, check: Callable[[], None]
) -> Any:
    check()
    if depth > _MAX_DEPTH:
        raise PurelensError(f"bad value: nested deeper than {_MAX_DEPTH} levels.")
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, dict) and len(value) == 1:  # a tagged value (the common case)
        ((tag, body),) = value.items()
        if tag == "tensor" and isinstance(body, str) and body in tensors:
            return tensors[body]
    if outputs and isinstance(value, dict) and value.keys() == {"model_output", "fields"}:
        if not isinstance(value["fields"], dict):
            raise PurelensError("bad value: a model output's fields are a mapping.")
        fields = {
            str(k): _decode_value(v, tensors, depth + 1, True, check)
            for k, v in value["fields"].items()
        }
        cls = _output_class(value["model_output"])
        if cls is None:
            return fields
        try:
            return cls(**fields)
        except Exception as e:  # a class's own checks raise TypeError, ValueError, ...
            error = f"{type(e).__name__}: {e}"
            raise PurelensError(_BAD_OUTPUT.format(cls=cls.__name__, error=error)) from None
    if not isinstance(value, dict) or len(value) != 1:
        raise PurelensError(f"bad value: {_serialize._short(value)} is not allowed.")
    ((tag, body),) = value.items()
    if tag in ("list", "tuple") and isinstance(body, list):
        items = [_decode_value(v, tensors, depth + 1, outputs, check) for v in body]
        return items if tag == "list" else tuple(items)
    if tag == "dict" and isinstance(body, list):
        out = {}
        for item in body:
            if not (isinstance(item, list) and len(item) == 2 and isinstance(item[0], str)):
                raise PurelensError("bad value: a dict is a list of [string key, value] pairs.")
            out[item[0]] = _decode_value(item[1], tensors, depth + 1, outputs, check)
        return out
    if tag == "float" and isinstance(body, str) and len(body) <= 32:
        try:
            return float(body)
        except ValueError:
            pass
    raise PurelensError(f"bad value: {tag!r} with {_serialize._short(body)} is not allowed.")


def _is_model_output(value: Any) -> bool:
    try:
        from transformers.utils import ModelOutput
    except ImportError:  # pragma: no cover - transformers is a dependency
        return False
    return isinstance(value, ModelOutput)


def _is_cache(value: Any) -> bool:
    try:
        from transformers.cache_utils import Cache
    except ImportError:  # pragma: no cover
        return False
    return isinstance(value, Cache)


def _output_class(name: Any) -> Any:
    """A HF model-output class by module and name, from the modules that define them only."""
    if not (isinstance(name, list) and len(name) == 2 and all(isinstance(n, str) for n in name)):
        return None
    module, qualname = name
    allowed = module in _OUTPUT_MODULES or (
        module.startswith("transformers.models.")
        and module.rsplit(".", 1)[-1].startswith("modeling_")
    )
    if not allowed or not qualname.isidentifier():
        return None
    try:
        cls = getattr(importlib.import_module(module), qualname, None)
    except ImportError:
        return None
    from transformers.utils import ModelOutput

    return cls if isinstance(cls, type) and issubclass(cls, ModelOutput) else None
