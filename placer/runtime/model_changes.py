"""What a placed model's graphs hold of the model, checked before every call.

placer.apply captures the model once: its graphs hold the parameters, buffers and
submodules the model had then, ran the hooks it had then, and baked in the Python
attributes its forward read (Dropout's `p`, a temperature, a flag, a config's
`output_hidden_states`, a tensor kept as a plain attribute). Any of these replaced,
added or removed afterwards (`m.fc.weight = nn.Parameter(...)`, `m.fc = nn.Linear(...)`,
`m.layers.append(...)`, `.to(torch.bfloat16)`, `.cuda()`,
`load_state_dict(..., assign=True)`, `m.scale = 2.0`, `m.config.use_cache = True`), a
module's class swapped (`m.__class__ = Other`: its forward is another), or a hook added
or removed, would be silently ignored: a wrong number (new-user trial 11).
`ModelSnapshot` notices such a change at the next call so that the call can refuse it.

Which attributes a forward reads cannot be seen from outside, so every attribute of
every module is checked, and of each plain object one holds (a config, its sub-configs,
HELD_DEPTH levels deep), its own attributes, but for what libraries write and no forward
reads (`_NOT_READ`: save_pretrained's config metadata, generation_config, TRL's tags;
loggers) and a new name, unless it hides its class's attribute: a bookkeeping attribute
changed after apply is refused too, and its fix is the same (apply the plan again to
`placed.original`). Not walked: objects in lists or dicts,
objects with __slots__ only, modules held outside the module tree (in a plain list).
Values are compared by identity in C-level loops (BERT-base's 228 modules: 0.25 ms on
a 2-core host, experiments/probe_snapshot.py, 0.05 of it the dtypes and classes) and,
where an attribute was reassigned, by value: setting an equal value again is no change (but a tensor: the graphs read the
old one, and would miss what is later written into the new). A dict's size shows an
entry added or removed, a hook removed too; a hook added anywhere moves torch's global
hook counter, so only then are the hook tables compared key by key. Changes made in
place (`weight.data = ...`, `load_state_dict`, an optimizer's step, `requires_grad_`, a
tensor attribute written into) keep the objects, and the graphs see them (one the
forward reads as a number is refused at capture: graphs.trace_effects.ValueReads), but for a
parameter's or buffer's dtype or device: `.to()` converts a parameter in place (`.data`),
and the graphs hold ops and constants of the old dtype (a float32 attention mask: GPT2
made bfloat16 after apply failed in torch) and moves between the plan's devices. A list
or dict attribute changed in place is not noticed.
"""

from __future__ import annotations

import functools
import logging
import operator
import reprlib
import types
import warnings
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from graphs.trace import _MODULE_ATTRS, _equal

__all__ = ["ModelSnapshot", "warn_of_forward_hooks"]


def warn_of_forward_hooks(model: nn.Module, stacklevel: int) -> None:
    """Warn where a module has forward (pre-)hooks: the capture holds what they compute on
    tensors, but their other Python work (logging, counting) runs only while the model is
    captured, if at all, never at a placed call (new-user trial 10). `stacklevel`: the
    caller's warnings.warn stacklevel of the user's line."""
    owners = [repr(name) if name else "the model" for name, m in model.named_modules()
              if m._forward_hooks or m._forward_pre_hooks]
    if owners:
        more = f" and {len(owners) - 1} other module(s)" if len(owners) > 1 else ""
        warnings.warn(f"placer: module {owners[0]}{more} has a forward hook: the placed model runs what it computes "
                      f"on tensors, as captured, but not its other Python work (logging, counters), which runs only "
                      f"while placer captures the model, if at all", stacklevel=stacklevel + 1)


# What no forward reads but libraries write during training (review 14): transformers' save_pretrained writes
# a config's metadata (a checkpoint every N steps must not stop training), generate's settings and TRL's tags
_NOT_READ = frozenset({"architectures", "dtype", "torch_dtype", "_name_or_path", "transformers_version",
                       "_commit_hash", "generation_config", "model_tags"})
_HOOKS = object()  # the owner of a hook table (ModelSnapshot._size)
_DTYPE, _DEVICE = operator.attrgetter("dtype"), operator.attrgetter("device")
HELD_DEPTH = 3  # how deep held plain objects are walked: a config, its sub-configs (config.text_config), theirs
_NOT_HELD = (nn.Module, torch.Tensor, type, types.FunctionType, types.BuiltinFunctionType, types.MethodType,
             types.ModuleType, functools.partial, logging.Logger)  # checked otherwise (modules, tensors), or not read


def _holds_attributes(value: Any) -> bool:
    """Whether `value` is a plain object whose own attributes a forward may read (a
    config, a callable activation object), not a module, tensor, function, class or
    Python module."""
    return hasattr(value, "__dict__") and not isinstance(value, _NOT_HELD)


def _global_hooks() -> list[dict]:
    """torch's hook tables for every module (torch.nn.modules.module's `_global_*_hooks`)."""
    tables = ("_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks",
              "_global_backward_pre_hooks")
    return [getattr(torch.nn.modules.module, name) for name in tables if hasattr(torch.nn.modules.module, name)]


def _converted(name: str, new: tuple[torch.dtype, torch.device], old: tuple[torch.dtype, torch.device]) -> str:
    """The phrase for tensor `name` now of another (dtype, device) than `old`."""
    if new[0] != old[0]:
        return (f"{name!r} is {new[0]} where it was {old[0]}: .to(), .half(), .cuda() and the like convert "
                f"parameters and buffers, and a plan is made for one dtype (the converted model needs its own)")
    return (f"{name!r} is on {new[1]} where the plan put it on {old[1]}: .to(), .half(), .cuda() and the like "
            f"move parameters and buffers")


def _hook_change(owner: str | None) -> str:
    """The phrase for a hook added to or removed from `owner`'s tables (None: torch's global ones)."""
    if owner is None:
        return "a global module hook was added or removed"
    return f"a hook of {f'module {owner!r}' if owner else 'the model'} was added or removed"


class ModelSnapshot:
    """The parameters, buffers, submodules, attributes and hooks of some modules, as they are now.

    Parameters
    ----------
    modules : (qualified name, module) pairs; each module's own tables are taken, not
        its children's (list the children too).
    live : modules among them that run as themselves (leaves) and read their insides
        live: only their parameters' and buffers' dtypes and devices are taken (converted,
        one would meet its neighbours' tensors of the old dtype: review 15).
    """

    def __init__(self, modules: list[tuple[str, nn.Module]], live: Iterable[nn.Module] = ()):
        self._dicts, self._keys, self._values, self._names = [], [], [], []  # tables' entries: compared by identity
        self._attr_dicts, self._attr_keys, self._attrs, self._attr_names = [], [], [], []  # then by value
        self._sized, self._sized_names, self._sized_owners = [], [], []  # every dict here: a key added or removed
        self._hooks, self._hook_owners = [], []  # shows in its length, and its keys then name it
        self._tensors, self._tensor_names = [], []  # parameters and buffers: their dtypes and devices
        live_ids = {id(m) for m in live}
        for prefix, module in modules:
            for key, value in [*module._parameters.items(), *module._buffers.items()]:
                if isinstance(value, torch.Tensor):
                    self._tensors.append(value)
                    self._tensor_names.append(f"{prefix}.{key}" if prefix else key)
        modules = [(prefix, module) for prefix, module in modules if id(module) not in live_ids]
        self._modules = [module for _, module in modules]
        self._module_names = [prefix for prefix, _ in modules]
        self._classes = list(map(type, self._modules))
        held: set[int] = set()  # ids of the plain objects taken
        for prefix, module in modules:
            for table in (module._parameters, module._buffers, module._modules):
                self._size(table, prefix, None)
                for key, value in table.items():
                    self._dicts.append(table)
                    self._keys.append(key)
                    self._values.append(value)
                    self._names.append(f"{prefix}.{key}" if prefix else key)
            self._add_attributes(module, prefix, lambda key: key not in _MODULE_ATTRS and key not in _NOT_READ,
                                 HELD_DEPTH, held)
            for hooks in (module._forward_hooks, module._forward_pre_hooks, module._backward_hooks,
                          getattr(module, "_backward_pre_hooks", {})):
                self._hooks.append(hooks)
                self._hook_owners.append(prefix)
        for hooks in _global_hooks():  # register_module_forward_hook and the like: every module's
            self._hooks.append(hooks)
            self._hook_owners.append(None)
        for hooks, owner in zip(self._hooks, self._hook_owners):
            self._size(hooks, owner, _HOOKS)
        self._sizes = list(map(len, self._sized))
        self._sized_keys = [frozenset(d) for d in self._sized]
        self._hook_keys = [tuple(h) for h in self._hooks]
        self._hooks_made = RemovableHandle.next_id  # every hook registration anywhere moves it
        self._dtypes = list(map(_DTYPE, self._tensors))
        # devices only where a tensor can move (a GPU): the walk costs BERT-base 48 us a call, the dtypes' 28
        self._devices = list(map(_DEVICE, self._tensors)) if torch.cuda.is_available() else None

    def _size(self, table: dict, prefix: str | None, owner: object | None) -> None:
        self._sized.append(table)
        self._sized_names.append(prefix)  # a hook table's: None for torch's global ones
        self._sized_owners.append(owner)  # None: a table of parameters, buffers or submodules; _HOOKS

    def _add_attributes(self, owner: object, prefix: str, kept, depth: int, held: set[int]) -> None:
        """Take the attributes of `owner` whose names pass `kept`, and those of the plain
        objects among them, `depth` levels deep, each once (`held`: the ids taken)."""
        attributes = vars(owner)
        self._size(attributes, prefix, owner)
        for key, value in attributes.items():
            if kept(key):
                name = f"{prefix}.{key}" if prefix else key
                self._attr_dicts.append(attributes)
                self._attr_keys.append(key)
                self._attrs.append(value)
                self._attr_names.append(name)
                if depth > 0 and _holds_attributes(value) and id(value) not in held:
                    held.add(id(value))
                    self._add_attributes(value, name, lambda k: k not in _NOT_READ, depth - 1, held)

    def change(self) -> str | None:
        """What changed since the snapshot, as a phrase ("'fc.weight' was replaced or
        removed", "attribute 'scale' changed from 1.0 to 2.0"); None when nothing did."""
        if RemovableHandle.next_id != self._hooks_made:  # a hook added somewhere (one removed: by size, below)
            keys = [tuple(h) for h in self._hooks]
            if keys != self._hook_keys:
                return _hook_change(next(o for k, was, o in zip(keys, self._hook_keys, self._hook_owners) if k != was))
            self._hooks_made = RemovableHandle.next_id  # hooks of other modules
        now = list(map(dict.get, self._dicts, self._keys))
        if any(map(operator.is_not, now, self._values)):
            new, old, name = next((a, b, n) for a, b, n in zip(now, self._values, self._names) if a is not b)
            if (isinstance(new, torch.Tensor) and isinstance(old, torch.Tensor)
                    and (new.dtype, new.device) != (old.dtype, old.device)):
                return _converted(name, (new.dtype, new.device), (old.dtype, old.device))  # .to() replaces buffers
            return (f"{name!r} was replaced or removed (by an assignment, load_state_dict(assign=True) or "
                    f"torch.func.functional_call, which placer cannot run)")
        if list(map(_DTYPE, self._tensors)) != self._dtypes or (
                self._devices is not None and list(map(_DEVICE, self._tensors)) != self._devices):
            return self._tensor_converted()
        if list(map(type, self._modules)) != self._classes:
            name, now, was = next((n, type(m), c) for n, m, c in zip(self._module_names, self._modules, self._classes)
                                  if type(m) is not c)
            return f"{f'module {name!r}' if name else 'the model'} is a {now.__name__} where it was a {was.__name__}"
        now = list(map(dict.get, self._attr_dicts, self._attr_keys))
        if any(map(operator.is_not, now, self._attrs)):
            for i, (new, old) in enumerate(zip(now, self._attrs)):
                if new is old:
                    continue
                if self._attr_keys[i] not in self._attr_dicts[i]:
                    return f"attribute {self._attr_names[i]!r} was removed"
                if isinstance(old, torch.Tensor) or not _equal(new, old):  # the graphs read the old tensor
                    return f"attribute {self._attr_names[i]!r} changed from {reprlib.repr(old)} to {reprlib.repr(new)}"
                self._attrs[i] = new  # an equal value set again: no change
        if list(map(len, self._sized)) != self._sizes:
            return self._entries_changed()
        return None

    def _tensor_converted(self) -> str:
        """The phrase for the first parameter or buffer converted in place."""
        return next(_converted(name, (t.dtype, t.device), was) for t, name, was in
                    zip(self._tensors, self._tensor_names, zip(self._dtypes, self._devices or map(_DEVICE, self._tensors)))
                    if (t.dtype, t.device) != was)

    def _entries_changed(self) -> str | None:
        """What was added to or removed from a table or an object's attributes: a new
        attribute counts only where it hides the class's own (a default `scale`, a
        property's value); a new name the captured forward cannot have read does not."""
        for i, (table, owner) in enumerate(zip(self._sized, self._sized_owners)):
            if len(table) == self._sizes[i]:
                continue
            now, was, prefix = frozenset(table), self._sized_keys[i], self._sized_names[i]
            named = sorted(repr(f"{prefix}.{k}" if prefix else k) for k in (now ^ was) - _NOT_READ)
            if owner is _HOOKS:
                return _hook_change(prefix)
            if owner is None:
                return f"{', '.join(named)} was added or removed"
            if was - now:
                return f"attribute {', '.join(named)} was removed"
            if any(hasattr(type(owner), key) for key in now - was - _NOT_READ):
                return f"attribute {', '.join(named)} was set, hiding its class's value"
            self._sizes[i], self._sized_keys[i] = len(table), now  # a new name: not read by the captured forward
        return None
