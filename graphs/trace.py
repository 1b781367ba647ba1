"""torch.fx tracing shared by capture (graphs.capture) and the runtime (placer.runtime).

Both must see the same graph, node for node, or a plan's node assignment would not
apply to the model it was made for; so both trace through `trace_model` and check
`fingerprint`.

A module fx cannot trace (data-dependent control flow, say) is retried as a leaf:
it becomes one opaque node, so the model is still placed, at coarser grain there.
Only when the root module itself cannot be traced is capture impossible.
"""

from __future__ import annotations

import hashlib
import linecache
import os
import traceback
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.fx as fx
from torch import nn

from graphs.errors import CaptureError

_TORCH_DIR = os.path.dirname(torch.__file__)
MAX_FALLBACK_LEAVES = 64


@dataclass(frozen=True)
class Traced:
    gm: fx.GraphModule
    leaf_paths: tuple[str, ...]  # module paths traced as leaves because fx failed inside them
    fallback_notes: tuple[str, ...]  # one line per fallback, for the user


class PlacerTracer(fx.Tracer):
    """fx.Tracer that keeps given module classes and module paths whole and remembers
    which module it was inside when tracing failed."""

    def __init__(self, leaf_classes: tuple[type, ...], leaf_paths: Iterable[str]):
        super().__init__()
        self.leaf_classes = leaf_classes
        self.leaf_paths = set(leaf_paths)
        self.failed_in: str | None = None  # innermost module path an exception passed through

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if qualname in self.leaf_paths or isinstance(m, self.leaf_classes):
            return True
        return super().is_leaf_module(m, qualname)

    def call_module(self, m, forward, args, kwargs):
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_in is None:
                self.failed_in = self.path_of_module(m)
            raise


def _user_frame(exc: BaseException) -> str:
    """file:line of the innermost traceback frame outside torch itself."""
    frames = [f for f in traceback.extract_tb(exc.__traceback__)
              if not f.filename.startswith(_TORCH_DIR) and f.filename != __file__]
    if not frames:
        return "unknown location"
    f = frames[-1]
    code = (linecache.getline(f.filename, f.lineno) or "").strip()
    return f"{f.filename}:{f.lineno}" + (f" ({code})" if code else "")


def trace_model(model: nn.Module, leaf_modules: Iterable[type] = (), leaf_paths: Iterable[str] = (),
                allow_fallback: bool = True) -> Traced:
    """Symbolically trace `model` into an fx.GraphModule that shares its parameters.

    `leaf_modules` are classes kept whole; `leaf_paths` module paths kept whole (a
    plan records those chosen by an earlier fallback so the runtime traces the same
    graph). With `allow_fallback`, a submodule that fails to trace is made a leaf and
    tracing retried. Raises CaptureError naming the module and source line otherwise.
    """
    leaf_classes = tuple(leaf_modules)
    paths = list(leaf_paths)
    notes: list[str] = []
    for _ in range(MAX_FALLBACK_LEAVES + 1):
        tracer = PlacerTracer(leaf_classes, paths)
        try:
            graph = tracer.trace(model)
        except Exception as exc:  # fx raises TraceError, TypeError, RuntimeError, ... from user code
            failed_in = tracer.failed_in or ""
            where = _user_frame(exc)
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            if allow_fallback and failed_in and failed_in not in paths:
                paths.append(failed_in)
                notes.append(f"fx could not trace inside '{failed_in}' ({reason} at {where}); "
                             f"it is placed as one unit")
                continue
            owner = f"module '{failed_in}'" if failed_in else f"the model's own forward ({type(model).__name__})"
            raise CaptureError(
                f"cannot trace {owner} at {where}: {reason}. "
                f"Mark the offending module class as a leaf with `leaf_modules = [ClassName]` in the workload file"
            ) from exc
        name = type(model).__name__
        gm = fx.GraphModule(model, graph, class_name=f"Traced{name}")
        return Traced(gm=gm, leaf_paths=tuple(paths), fallback_notes=tuple(notes))
    raise CaptureError(f"gave up tracing {type(model).__name__}: more than {MAX_FALLBACK_LEAVES} modules fail to trace")


def target_name(node: fx.Node) -> str:
    """A process-independent name of a node's target (a function's repr has an address)."""
    if isinstance(node.target, str):
        return node.target
    try:
        return fx.node._get_qualified_name(node.target)
    except Exception:  # some builtins have no importable qualified name
        return getattr(node.target, "__name__", type(node.target).__name__)


def fingerprint(model: nn.Module, gm: fx.GraphModule) -> str:
    """A short hash of the model's parameter names and shapes and of the traced graph's
    structure (node ops, targets and edges). Equal models give equal fingerprints."""
    h = hashlib.sha256()
    for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
        h.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype};".encode())
    for node in gm.graph.nodes:
        inputs = ",".join(n.name for n in node.all_input_nodes)
        h.update(f"{node.op}|{target_name(node)}|{node.name}|{inputs};".encode())
    return h.hexdigest()[:16]
