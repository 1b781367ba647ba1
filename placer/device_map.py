"""accelerate-style device maps of a plan: which device each module (or, where a
module is split, each parameter) of the model is on, in the device names
accelerate's dispatch_model accepts. A plan stores one (placer.plan.Plan.device_map)
for users who load the model with accelerate instead of placer.apply."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

__all__ = ["accelerate_name", "derive_device_map", "accelerate_device_map"]


def accelerate_name(device: str) -> str:
    """The name accelerate's dispatch_model accepts for a placer device: every CPU
    device (virtual or not) is "cpu", a GPU "cuda:N"; an owner prefix (rankR:) goes."""
    local = device.split(":", 1)[1] if device.startswith("rank") else device
    if local.startswith("cpu"):
        return "cpu"
    return local if ":" in local else f"{local}:0"


def derive_device_map(node_modules: Mapping[str, str], node_params: Mapping[str, Iterable[str]],
                      assignment: Mapping[str, str]) -> dict[str, str]:
    """accelerate-style device map: the highest modules whose nodes and parameters all
    sit on one device, plus single parameters of modules that are split.

    Parameters
    ----------
    node_modules : node -> owning module path ("" for the root).
    node_params : node -> qualified names of the parameters and buffers it reads.
    assignment : node -> device name.

    Returns
    -------
    module path (or parameter name) -> device name, sorted by key.

    Examples
    --------
    >>> derive_device_map({"a": "m", "b": "m.inner"}, {"a": ["m.w"], "b": []}, {"a": "cpu:0", "b": "cpu:1"})
    {'m.inner': 'cpu:1', 'm.w': 'cpu:0'}
    """
    devices_under: dict[str, set[str]] = {}  # module path -> devices of everything inside it
    param_device: dict[str, str] = {}

    def note(path: str, device: str) -> None:
        parts = path.split(".") if path else []
        for i in range(len(parts) + 1):
            devices_under.setdefault(".".join(parts[:i]), set()).add(device)

    for node, device in assignment.items():
        note(node_modules.get(node, ""), device)
        for p in node_params.get(node, ()):
            param_device[p] = device
            note(p.rpartition(".")[0], device)

    def parent(path: str) -> str | None:
        return None if path == "" else path.rpartition(".")[0]

    def single(path: str | None) -> bool:
        return path is not None and len(devices_under.get(path, ())) == 1

    device_map = {}
    for path, devs in devices_under.items():
        if single(path) and not single(parent(path)):
            device_map[path] = next(iter(devs))
    for p, device in param_device.items():
        if not single(p.rpartition(".")[0]):
            device_map[p] = device
    return dict(sorted(device_map.items()))


def accelerate_device_map(device_map: Mapping[str, str], tensor_names: Iterable[str], default: str) -> dict[str, str]:
    """`device_map` in accelerate's device names, completed so that it covers every
    name in `tensor_names` (the model's state_dict keys): a tensor no node reads goes
    with the highest module of its path that no entry covers, on `default`."""
    result = {key: accelerate_name(device) for key, device in device_map.items()}

    def covered(name: str) -> bool:
        return "" in result or any(name == k or name.startswith(k + ".") for k in result)

    def inside(path: str) -> bool:  # some entry lies inside this module path
        return any(k == path or k.startswith(path + ".") for k in result) if path else bool(result)

    for name in tensor_names:
        if covered(name):
            continue
        parts = name.split(".")
        key = next((".".join(parts[:i]) for i in range(1, len(parts)) if not inside(".".join(parts[:i]))), name)
        result[key] = accelerate_name(default)
    return dict(sorted(result.items()))
