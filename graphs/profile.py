"""Profile an OpGraph: measured time and memory per node, per device kind, cached on disk.

How each number is obtained (all on a private copy of the model, so the user's weights are never touched):
- one real forward of the traced module records every node's output, and, through saved-tensor hooks, which
  node saved which tensors for backward (`act_bytes`: de-duplicated by storage, parameters excluded, a tensor
  counted at its first saver);
- each node is then re-run alone on detached copies of its recorded inputs: its forward (with autograd
  recording, as in training) and, when its output needs a gradient, its backward; the median of up to `repeats`
  samples after one warm-up call (time_ms), each long enough for the clock's resolution not to matter. A slow
  node gets fewer samples (NODE_BUDGET_MS): its relative noise is small, and repeating the convolutions of a big
  CNN five times would multiply the profiling time for little gain;
- an optimizer step on zero gradients gives the optimizer state's size per parameter (`opt_bytes`); the median
  time of further steps is spread over the nodes by parameter bytes (`opt_ms`);
- whole training steps of the model (zero-grad, forward, loss, backward, optimizer step; the median of rounds
  that take every micro-batch count in turn, each sample after a warm-up step: _microbatch_step_samples) give
  the total the node times are scaled to, their least over their median (`whole_step_spread`, for the lower
  bound), and, run at batch / m for m in MICROBATCHES where the batch (the first input's length along its
  batch dimension: the workload's `batch_dims`, else 0) divides, the cost of m micro-batches:
  `graph["microbatch_step_ms"] = {m: m x ms of a step at batch / m}` on the first profiled kind
  (`graph["microbatch_step_ms_by_kind"]`: every kind's), which the simulator scales node costs by, and
  `graph["microbatch_absent"] = {m: why no step was timed at batch / m}` (the notes tell users).
A shared parameter is counted at its first user only. The graph profiled is the one the runtime runs: captured
again from the private copy the same way (graphs.trace), checked by fingerprint.
"""

from __future__ import annotations

import platform
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import networkx as nx
import torch
import torch.fx as fx
from torch.fx.node import map_aggregate

from graphs import profile_cache
from graphs.capture import NodeFailure, failure_on_inputs, forward_names, input_batch_dims
from graphs.errors import CaptureError, DeviceSpecError, WorkloadError, exit_error
from graphs.files import cache_dir as default_cache_dir
from graphs.node_values import as_leaf, rebuilt
from graphs.timing import cpu_threads, state_kept, time_ms
from graphs.trace import fingerprint, is_pure, trace_model
from graphs.workload import Workload, first_line

KINDS = ("cpu", "cuda")
WHOLE_STEP_REPEATS = 3  # rounds of whole steps timed to scale the node times (each may take seconds) ...
WHOLE_STEP_ROUNDS = 9  # ... and more, up to this many, while the rounds so far took under
WHOLE_STEP_BUDGET_MS = 1000.0  # this long: a short step is noisy (+-30% step to step on a 2-core VM)
MICROBATCHES = (1, 2, 4, 8)  # micro-batch counts whose whole-step cost is measured
CACHE_VERSION = 7  # 2: node times scaled to the measured whole step; 3: export capture, micro-batch steps;
# 4: the scale factor kept (profile_scale); 5: micro-batches sliced along batch_dims (in the key);
# 6: a slow call's warm-up no longer counted as a sample (time_ms); 7: more rounds of short whole steps,
# and their least over their median kept (whole_step_spread). Since s26 the batch is split as the runtime splits it and
# the profile says why a count is absent (microbatch_absent); a file without that, with every count, is what the new
# rule makes (the rules differ only for inputs of unequal lengths, which had no count but 1), one without every count
# is profiled again (_usable)

Progress = Callable[[int, int], None]


def profile(ops: nx.DiGraph, workload: Workload, kinds: Sequence[str] = ("cpu",), threads: int | None = None,
            repeats: int = 5, cache_dir: str | Path | None = None, progress: Progress | None = None) -> nx.DiGraph:
    """An annotated copy of `ops` (schema in graphs/__init__.py) with measured costs on
    every available kind in `kinds`; "cuda" is skipped with a note in `workload.notes`
    where no GPU is visible. `threads` sets torch's CPU threads while profiling "cpu".
    Results are cached under `cache_dir` (default: $PLACER_CACHE or ~/.cache/placer);
    an unusable cache is a miss with a warning (graphs.profile_cache).

    Raises
    ------
    DeviceSpecError : an unknown kind, or no requested kind available.
    CaptureError : the private copy captures into another graph than `ops`.
    WorkloadError : a training step of the model, or its make_optimizer, fails.
    """
    unknown = [k for k in kinds if k not in KINDS]
    if unknown:
        raise DeviceSpecError(f"cannot profile on device kind '{unknown[0]}'; known kinds: {', '.join(KINDS)}")
    available = [k for k in dict.fromkeys(kinds) if k != "cuda" or torch.cuda.is_available()]
    if "cuda" in kinds and "cuda" not in available:
        workload.notes.append("cuda was not profiled: no GPU is visible")
    if not available:
        raise DeviceSpecError("no requested device kind is available to profile on (cuda requested, no GPU visible)")

    cache = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    results, todo = {}, []
    for kind in available:
        key = _cache_key(ops, workload, kind, threads, repeats)
        cached = _usable(profile_cache.load(cache, key, set(ops.nodes)))
        if cached is None:
            todo.append((kind, key))
        else:
            results[kind] = cached
    total = len(todo) * ops.number_of_nodes()
    for i, (kind, key) in enumerate(todo):
        step = None if progress is None else (lambda done, _, base=i * ops.number_of_nodes(): progress(base + done, total))
        with cpu_threads(threads if kind == "cpu" else None):
            results[kind] = _measure(ops, workload, torch.device(kind), repeats, step)
        profile_cache.store(cache, key, results[kind])
    return _annotated(ops, results)


def _usable(cached: dict | None) -> dict | None:
    """A cached profile as the current rule would make it (CACHE_VERSION's note), or None: profile again."""
    if cached is None or cached["microbatch_absent"] is not None:
        return cached
    return {**cached, "microbatch_absent": {}} if set(cached["microbatch_step_ms"]) == set(MICROBATCHES) else None


def _measure(ops: nx.DiGraph, workload: Workload, device: torch.device, repeats: int,
             progress: Progress | None) -> dict:
    """{"nodes": {node name: {fwd_ms, bwd_ms, opt_ms, param_bytes, grad_bytes, opt_bytes,
    act_bytes}}, "microbatch_step_ms": {m: ms}, "profile_scale": the factor node times
    were scaled by, "whole_step_spread": the least whole step at the full batch over its
    median (<= 1)}."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    model = workload.fresh_model().to(device)
    model.train()
    inputs = tuple(t.to(device) for t in workload.inputs)
    method = ops.graph.get("capture", {}).get("method", "fx")
    traced = trace_model(model, workload.leaf_modules, ops.graph.get("leaf_paths", ()), allow_fallback=False,
                         inputs=inputs, method=method, batch_dims=workload.batch_dims)
    gm = traced.gm
    if fingerprint(model, gm) != ops.graph["fingerprint"]:
        raise CaptureError(f"{workload.spec}: the graph to profile was captured from a different model "
                           f"(fingerprint {ops.graph['fingerprint']})")

    opt_state_bytes, step_ms = _optimizer_step(model, workload, repeats, sync)
    recorder = _Recorder(gm, model)
    with state_kept(model):
        try:
            recorder.record(*traced.bind(inputs, {}).values())
        except NodeFailure as failure:  # the model on its inputs (a WorkloadError), or the capture (placer's bug)
            raise failure_on_inputs(workload.spec, model, inputs, failure)

    named = dict(model.named_parameters()) | dict(model.named_buffers())
    trainable_bytes = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad) or 1
    counted: set[str] = set()
    result = {}
    nodes = [n for n in gm.graph.nodes if n.name in ops]  # get_attr nodes are part of their readers
    for done, node in enumerate(nodes, 1):
        fwd = bwd = 0.0
        if node.op.startswith("call_"):
            try:
                fwd, bwd = _time_node(node, gm, recorder.env, repeats, sync)
            except Exception as exc:
                raise CaptureError(f"{workload.spec}: cannot time node '{node.name}' ({ops.nodes[node.name]['target']}) "
                                   f"on its own: {type(exc).__name__}: {str(exc).strip().splitlines()[0]}") from exc
        param = grad = opt = 0
        for name, nbytes in ops.nodes[node.name]["params"].items():
            if name in counted:
                continue
            counted.add(name)
            param += nbytes
            if named[name].requires_grad:
                grad += nbytes
                opt += opt_state_bytes.get(name, 0)
        result[node.name] = {"fwd_ms": fwd, "bwd_ms": bwd, "opt_ms": step_ms * grad / trainable_bytes,
                             "param_bytes": param, "grad_bytes": grad, "opt_bytes": opt,
                             "act_bytes": recorder.saved_bytes.get(node.name, 0)}
        if progress is not None:
            progress(done, len(nodes))
    samples, absent = _microbatch_step_samples(model, workload, inputs, repeats, sync)
    steps = {m: statistics.median(ms) for m, ms in samples.items()}
    scale = _scale_to_whole_step(result, steps[1])
    return {"nodes": result, "microbatch_step_ms": steps, "microbatch_absent": absent, "profile_scale": scale,
            "whole_step_spread": min(samples[1]) / steps[1] if steps[1] > 0 else 1.0}


def _microbatch_step_samples(model: torch.nn.Module, workload: Workload, inputs: tuple, repeats: int,
                            sync) -> tuple[dict[int, list[float]], dict[int, str]]:
    """({m: samples of m x ms of one real training step (zero-grad, forward, loss, backward, optimizer step)
    at batch / m}, {m: why there is none}), on the profiled device, for each m in MICROBATCHES. The batch is
    split as the runtime splits it (placer.runtime.microbatch.split_dims): the first input with a batch
    dimension (the workload's `batch_dims`, else 0) gives its length, every input as long along its own is
    split, the others go whole to every micro-batch. A count is absent where it does not divide the batch or
    the model does not run at its size (BatchNorm refuses a batch of one, say). m = 1 is the whole step; its
    failure is a WorkloadError.

    The counts are timed in rounds, each taking every count in turn (one sample after its own warm-up call),
    and the profile keeps each count's median: a burst of load on the host then disturbs one sample of every
    count instead of every sample of one, and the table's ratios, which scale every micro-batch's costs, stay
    those of one moment. (Timed count by count, nmt-medium once recorded a step at batch/8 dearer than one at
    batch/4.) min(repeats, WHOLE_STEP_REPEATS) rounds at least; where repeats allows that many, more while the
    rounds fit in WHOLE_STEP_BUDGET_MS, up to WHOLE_STEP_ROUNDS: a 7 ms step of zoo:transformer:small ran
    5.96-8.94 ms in three rounds, and a median of three then set the lower bound's costs 20% above the steps
    measured seconds later (tests/test_bounds.py)."""
    dims = input_batch_dims(model, inputs, workload.batch_dims)
    lengths = [t.shape[d] if d is not None and t.dim() > d else None for t, d in zip(inputs, dims)]
    batch = next((n for n in lengths if n is not None), None)
    names = [name or f"#{i}" for i, name in enumerate(forward_names(model, inputs))]  # as messages name inputs
    split = [name for name, n in zip(names, lengths) if n is not None and n == batch]
    absent = {m: (f"the batch ({batch} rows of input {split[0]!r}, the first with a batch dimension) does not divide "
                  f"into m" if batch else
                  "no input has a batch dimension to split (each is 0-dimensional or marked None in batch_dims)")
              for m in MICROBATCHES if m > 1 and not (batch and batch % m == 0)}
    by_chance = (f" (inputs split: {', '.join(split)}; one not batched but as long as the batch by chance goes whole "
                 f"to every micro-batch where the workload's batch_dims marks it None)") if len(split) > 1 else ""
    parts = {m: tuple(t.narrow(d, 0, n // m) if n is not None and n == batch else t
                      for t, d, n in zip(inputs, dims, lengths))
             for m in MICROBATCHES if m not in absent}
    samples: dict[int, list[float]] = {m: [] for m in parts}
    least = max(1, min(repeats, WHOLE_STEP_REPEATS))
    most = WHOLE_STEP_ROUNDS if repeats >= WHOLE_STEP_REPEATS else least
    start, rounds = time.perf_counter(), 0
    while rounds < least or (rounds < most and (time.perf_counter() - start) * 1e3 < WHOLE_STEP_BUDGET_MS):
        rounds += 1
        for m in list(samples):
            try:
                samples[m].append(m * _whole_step_ms(model, workload, parts[m], 1, sync))
            except WorkloadError as exc:
                if m == 1:
                    raise
                cause = exc.__cause__ or exc
                absent[m] = (f"a training step at batch / m fails: {type(cause).__name__}: {first_line(cause)}"
                             f"{by_chance}")
                del samples[m]
    return samples, absent


def _whole_step_ms(model: torch.nn.Module, workload: Workload, inputs: tuple, repeats: int, sync) -> float:
    """Median ms of one real training step of the whole model on `inputs`; the
    model's parameters, buffers and gradients are left as they were found."""
    optimizer = workload.make_optimizer([p for p in model.parameters() if p.requires_grad])

    def step():
        optimizer.zero_grad()
        workload.loss_fn(model(*inputs), *inputs).backward()
        optimizer.step()

    with state_kept(model):
        try:
            ms, _ = time_ms(step, min(repeats, WHOLE_STEP_REPEATS), sync, budget_ms=float("inf"))
        except WorkloadError:
            raise
        except SystemExit as exc:
            raise exit_error(f"{workload.spec}: the model's forward", exc.code) from None
        except Exception as exc:
            raise WorkloadError(f"{workload.spec}: a training step of the model fails: {type(exc).__name__}: "
                                f"{first_line(exc)}; fix: the step must run in plain PyTorch (zero_grad, "
                                f"loss_fn(model(*inputs), *inputs).backward(), the optimizer's step): run it there "
                                f"to find the line") from exc
    return ms


def _scale_to_whole_step(result: dict[str, dict], step_ms: float) -> float:
    """Scale every node's forward and backward time so that they add up, with the optimizer step, to the
    measured whole step, and return the factor (1 where nothing was timed; graphs.bounds undoes a factor above
    1). Timing a node alone pays a dispatch and an autograd-engine start of its own, which inflates the sum of
    small nodes several times over (2.6x on zoo:rnnlm:small); the whole step is the truth about the total, the
    isolated timings about the shares. The loss is spread likewise."""
    compute = sum(r["fwd_ms"] + r["bwd_ms"] for r in result.values())
    optimizer = sum(r["opt_ms"] for r in result.values())
    if compute <= 0:
        return 1.0
    scale = max(step_ms - optimizer, 0.1 * compute) / compute
    for r in result.values():
        r["fwd_ms"] *= scale
        r["bwd_ms"] *= scale
    return scale


class _Recorder(fx.Interpreter):
    """Runs the traced module once with autograd on, keeping every node's output (env)
    and the bytes each node saves for backward."""

    def __init__(self, gm: fx.GraphModule, model: torch.nn.Module):
        super().__init__(gm, garbage_collect_values=False)
        self.param_storages = {_storage_key(t) for t in list(model.parameters()) + list(model.buffers())}
        self.seen_storages: set = set()
        self.saved_bytes: dict[str, int] = {}
        self.current = ""

    def record(self, *inputs):
        with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t):
            return self.run(*inputs)

    def run_node(self, n: fx.Node):
        self.current = n.name
        try:
            return super().run_node(n)
        except (Exception, SystemExit) as exc:
            raise NodeFailure(n) from exc

    def _pack(self, t: torch.Tensor):
        key = _storage_key(t)
        if key not in self.param_storages and key not in self.seen_storages:
            self.seen_storages.add(key)
            self.saved_bytes[self.current] = self.saved_bytes.get(self.current, 0) + _storage_bytes(t)
        return t


def _time_node(node: fx.Node, gm: fx.GraphModule, env: dict, repeats: int, sync) -> tuple[float, float]:
    """(forward ms, backward ms) of one node run alone on detached copies of its inputs:
    copies of their values too where the node may write its inputs (an in-place op, a
    module, a method), so that its repeated runs never change what later nodes read
    (an index grown by a repeated `add_` would overrun the embedding reading it)."""
    copy_values = not is_pure(node)
    args, kwargs = map_aggregate((node.args, node.kwargs),
                                 lambda a: as_leaf(env[a], copy_values) if isinstance(a, fx.Node) else a)
    leaves = [t for t in _tensors((args, kwargs)) if t.requires_grad]
    if node.op == "call_module":
        fn = gm.get_submodule(node.target)
        leaves += [p for p in fn.parameters() if p.requires_grad]
    elif node.op == "call_method":
        fn = lambda obj, *a, **k: getattr(obj, node.target)(*a, **k)  # noqa: E731
    else:
        fn = node.target

    def forward():
        with torch.enable_grad():
            return fn(*args, **kwargs)

    def forward_on_copies():  # for an in-place op on a leaf that requires grad
        with torch.enable_grad():
            fresh_args, fresh_kwargs = rebuilt((args, kwargs), torch.Tensor.clone)
            return fn(*fresh_args, **fresh_kwargs)

    try:
        fwd, output = time_ms(forward, repeats, sync)
    except RuntimeError:
        fwd, output = time_ms(forward_on_copies, repeats, sync)
    outs = [t for t in _tensors(output) if t.requires_grad]
    if not outs or not leaves:
        return fwd, 0.0
    grads = [torch.ones_like(t) for t in outs]
    bwd, _ = time_ms(lambda: torch.autograd.grad(outs, leaves, grads, retain_graph=True, allow_unused=True),
                     repeats, sync)
    return fwd, bwd


def _optimizer_step(model: torch.nn.Module, workload: Workload, repeats: int, sync) -> tuple[dict[str, int], float]:
    """({parameter name: optimizer-state bytes}, median ms of a step), from steps on zero
    gradients: the state and the step's cost do not depend on the gradients' values."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        return {}, 0.0
    try:
        optimizer = workload.make_optimizer(params)
    except WorkloadError:
        raise
    except Exception as exc:
        raise WorkloadError(f"{workload.spec}: make_optimizer(params) raised {type(exc).__name__}: {first_line(exc)}; "
                            f"it must return a torch.optim.Optimizer over the parameters it is given") from exc
    for p in params:
        p.grad = torch.zeros_like(p)
    optimizer.step()  # creates the optimizer state
    state_bytes = {}
    for name, p in model.named_parameters():
        state = optimizer.state.get(p, {})
        state_bytes[name] = sum(v.numel() * v.element_size() for v in state.values() if isinstance(v, torch.Tensor))
    step_ms, _ = time_ms(optimizer.step, repeats, sync)
    model.zero_grad(set_to_none=True)
    return state_bytes, step_ms


def _annotated(ops: nx.DiGraph, results: dict[str, dict]) -> nx.DiGraph:
    g = ops.copy()
    g.graph["device_kinds"] = list(results)
    by_kind = {kind: dict(r["microbatch_step_ms"]) for kind, r in results.items()}
    g.graph["microbatch_step_ms"] = next(iter(by_kind.values()))  # seam 4: the first kind's
    g.graph["microbatch_step_ms_by_kind"] = by_kind
    g.graph["microbatch_absent"] = {int(m): why for m, why in next(iter(results.values()))["microbatch_absent"].items()}
    g.graph["profile_scale"] = {kind: float(r["profile_scale"]) for kind, r in results.items()}
    g.graph["whole_step_spread"] = {kind: float(r["whole_step_spread"]) for kind, r in results.items()}
    first = next(iter(results.values()))["nodes"]
    for name, data in g.nodes(data=True):
        for attr in ("fwd_ms", "bwd_ms", "opt_ms"):
            data[attr] = {kind: float(r["nodes"][name][attr]) for kind, r in results.items()}
        for attr in ("param_bytes", "grad_bytes", "opt_bytes", "act_bytes"):
            data[attr] = int(first[name][attr])  # memory does not depend on the kind
    return g


# --- on-disk cache -----------------------------------------------------------------

def _cache_key(ops: nx.DiGraph, workload: Workload, kind: str, threads: int | None, repeats: int) -> dict:
    if kind == "cuda":
        device = torch.cuda.get_device_name()
    else:
        device = f"{platform.machine()}:{threads or torch.get_num_threads()} threads"
    optimizer = getattr(workload.make_optimizer, "fn", workload.make_optimizer)  # a WorkloadFunction's own
    return {
        "version": CACHE_VERSION,
        "fingerprint": ops.graph["fingerprint"],
        "inputs": [[list(t.shape), str(t.dtype)] for t in workload.inputs],
        "batch_dims": dict(sorted(workload.batch_dims.items())),
        "kind": kind,
        "device": device,
        "repeats": repeats,
        "torch": torch.__version__,
        "optimizer": f"{getattr(optimizer, '__module__', '')}.{getattr(optimizer, '__qualname__', repr(optimizer))}",
    }


# --- small helpers -----------------------------------------------------------------

def _tensors(value) -> list[torch.Tensor]:
    found = []
    map_aggregate(value, lambda v: found.append(v) if isinstance(v, torch.Tensor) else None)
    return found


def _storage_key(t: torch.Tensor):
    try:
        return (t.device.type, t.untyped_storage().data_ptr())
    except (RuntimeError, NotImplementedError):  # tensors without storage (sparse, nested)
        return ("id", id(t))


def _storage_bytes(t: torch.Tensor) -> int:
    try:
        return t.untyped_storage().nbytes()
    except (RuntimeError, NotImplementedError):
        return t.numel() * t.element_size()
