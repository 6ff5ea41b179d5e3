"""One thread steps a vLLM engine, so that every purelens call joins one continuous batch.

`vllm.LLM.generate` runs the engine until its own requests are done and is
not made for several callers at once. purelens instead gives each engine
that `pl.vllm.load` made one thread (`Loop`) that adds requests, steps the
engine while any are unfinished, hands each call its outputs when its last
request finishes, and runs the calls to the worker (`collective_rpc`)
between steps. `pl.generate` and `pl.run` on the engine, from any thread
(a server's request handlers), submit to it and wait: concurrent calls are
batched together by vLLM, each request with its own interventions.

An engine whose worker runs in this process on the CPU runs its model in that
thread. There torch's OpenMP ops are several times slower with more than one
intra-op thread than in the main thread (measured: a layer norm of
``[12, 128]`` 5 us in the main thread, 37 us in another, 5 us there with one
thread; a whole forward of the bundled model 0.6 ms against 1.6 ms), so the
loop runs its own torch ops on one OpenMP thread, as vLLM means to serve on
the CPU (``vllm.utils.torch_utils.set_torch_threads_for_runtime``).
``torch.set_num_threads`` would set every thread started later to one too (and
vLLM's CPU worker makes it a no-op): OpenMP's own call sets the calling
thread's alone.
"""

from __future__ import annotations

import ctypes
import queue
import threading
import weakref
from typing import Any

import torch

from .._errors import PurelensError

__all__ = ["loop_of"]

_ENGINE_FAILED = (
    "the vLLM engine failed while it ran this call's requests ({error}); they were "
    "aborted.\n  Requests running beside them failed too; load the engine again if it "
    "keeps failing."
)
_REFUSED = "vLLM refused prompt {index}: {error}"

_loops: weakref.WeakKeyDictionary[Any, Loop] = weakref.WeakKeyDictionary()
_loops_lock = threading.Lock()


class LoopTimeout(Exception):
    """A call's requests did not finish within the seconds it had (they were aborted)."""


class _Call:
    def __init__(self, count: int, finish: tuple[str, tuple[Any, ...]] | None) -> None:
        self.outputs: list[Any] = [None] * count
        self.left = count
        self.error: BaseException | None = None
        self.refused: int | None = None  # the prompt vLLM would not take, if any
        self.finish = finish  # the rpc to run once the call's requests have finished
        self.finished: list[Any] | None = None  # its result
        self.finish_error: BaseException | None = None  # or how it failed
        self.done = threading.Event()


class Loop:
    """The thread that owns one engine's steps (see the module docstring)."""

    def __init__(self, llm: Any, *, cpu: bool) -> None:
        self._llm = weakref.ref(llm)
        self._cpu = cpu  # the engine's model runs in this thread, on the CPU
        self._commands: queue.Queue[tuple[str, Any]] = queue.Queue()
        self._waiting: dict[str, tuple[_Call, int]] = {}  # key -> (call, index)
        self._internal: dict[str, str] = {}  # vLLM's request id -> key
        self._rid_of: dict[str, str] = {}  # key -> vLLM's request id
        self._thread = threading.Thread(target=self._run, name="purelens-vllm", daemon=True)
        self._thread.start()

    # --- called from any thread --------------------------------------------------

    def generate(
        self,
        requests: list[Any],
        params: list[Any],
        keys: list[str],
        seconds: float | None,
        finish: tuple[str, tuple[Any, ...]] | None = None,
    ) -> tuple[list[Any], list[Any] | None]:
        """The outputs of `requests`, in order, once all have finished; and the result of
        the rpc `finish` (method, args), which the loop runs right after the last one
        finished, before its next step (None where it did not run: then the caller
        runs it; where it raised, this raises that). Run in the loop, it saves the caller
        a round trip through the loop."""
        call = _Call(len(requests), finish)
        self._commands.put(("add", (call, requests, params, keys)))
        if not call.done.wait(timeout=seconds):
            self._commands.put(("abort", keys))
            raise LoopTimeout
        if call.refused is not None:
            message = _REFUSED.format(index=call.refused, error=call.error)
            raise PurelensError(message) from call.error
        if call.error is not None:
            raise PurelensError(_ENGINE_FAILED.format(error=call.error)) from call.error
        if call.finish_error is not None:
            raise call.finish_error
        return call.outputs, call.finished

    def rpc(self, method: str, args: tuple[Any, ...], seconds: float | None = None) -> Any:
        """``collective_rpc(method, args)``, run between two engine steps."""
        result: list[Any] = []
        failed: list[BaseException] = []
        done = threading.Event()
        self._commands.put(("rpc", (method, args, result, failed, done)))
        if not done.wait(timeout=seconds):
            raise LoopTimeout
        if failed:
            raise failed[0]
        return result[0]

    # --- the loop -----------------------------------------------------------------

    def _run(self) -> None:
        if self._cpu:
            _one_openmp_thread()
        while True:
            llm = self._llm()
            if llm is None:
                return
            try:  # block for work only while no request is running
                if self._waiting:
                    command = self._commands.get_nowait()
                else:
                    command = self._commands.get(timeout=1.0)
            except queue.Empty:
                command = None
            while command is not None:
                self._do(llm, *command)
                try:
                    command = self._commands.get_nowait()
                except queue.Empty:
                    command = None
            if self._waiting:
                self._step(llm)
            del llm

    def _do(self, llm: Any, kind: str, payload: Any) -> None:
        engine = llm.llm_engine
        if kind == "add":
            call, requests, params, keys = payload
            for index, (request, sp, key) in enumerate(zip(requests, params, keys, strict=True)):
                try:
                    rid = engine.add_request(key, request, sp)
                except Exception as error:  # a prompt the engine refuses (too long, ...)
                    call.error, call.refused = error, index
                    self._abort(engine, _ids_of(self._waiting, call))
                    call.done.set()
                    return
                # Outputs name the request by the id given, or by the one vLLM made of it.
                self._waiting[key] = (call, index)
                self._internal[rid] = key
                self._rid_of[key] = rid
        elif kind == "abort":
            self._abort(engine, [key for key in payload if key in self._waiting])
        elif kind == "rpc":
            method, args, result, failed, done = payload
            try:
                result.append(llm.collective_rpc(method, args=args))
            except Exception as error:
                failed.append(error)
            done.set()

    def _abort(self, engine: Any, keys: list[str]) -> None:
        """Abort `keys` in vLLM (their KV blocks are freed) and forget them."""
        if keys:
            try:
                engine.abort_request(keys, internal=False)
            except Exception:  # an engine that broke: nothing of theirs runs any more
                pass
        for key in keys:
            self._forget(key)

    def _forget(self, key: str) -> None:
        self._waiting.pop(key, None)
        rid = self._rid_of.pop(key, None)
        if rid is not None:
            self._internal.pop(rid, None)

    def _step(self, llm: Any) -> None:
        engine = llm.llm_engine
        try:
            outputs = engine.step()
        except Exception as error:  # the engine broke: every waiting call learns of it
            calls = {id(call): call for call, _ in self._waiting.values()}
            # Aborted, so that no request left half-run keeps its KV blocks for ever.
            self._abort(engine, list(self._waiting))
            for call in calls.values():
                call.error = error
                call.done.set()
            return
        for output in outputs:
            if not output.finished:
                continue
            key = self._internal.get(output.request_id, output.request_id)
            entry = self._waiting.get(key)
            self._forget(key)
            if entry is None:
                continue
            call, index = entry
            call.outputs[index] = output
            call.left -= 1
            if call.left == 0:
                if call.finish is not None:
                    try:
                        call.finished = llm.collective_rpc(call.finish[0], args=call.finish[1])
                    except Exception as error:  # for the caller to raise: it may have
                        call.finish_error = error  # done part of its work (collected)
                call.done.set()


def _one_openmp_thread() -> None:
    """This thread's torch ops on one OpenMP thread, other threads' as they were (see the
    module docstring). Where OpenMP's call cannot be found, they stay slower, not wrong."""
    torch.get_num_threads()  # torch sets up a thread's OpenMP threads on first use: first
    try:
        ctypes.CDLL(None).omp_set_num_threads(1)
    except (AttributeError, OSError):
        pass


def _ids_of(waiting: dict[str, tuple[_Call, int]], call: _Call) -> list[str]:
    return [rid for rid, (c, _) in waiting.items() if c is call]


def loop_of(llm: Any, *, cpu: bool = False) -> Loop:
    """The engine's loop, started on first use (`pl.vllm.load` starts it, saying whether
    the engine's model runs in it on the CPU)."""
    with _loops_lock:
        loop = _loops.get(llm)
        if loop is None:
            loop = _loops[llm] = Loop(llm, cpu=cpu)
        return loop
