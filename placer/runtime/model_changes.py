"""What a placed model's graphs hold of the model, checked before every call.

placer.apply captures the model once: its graphs hold the parameters, buffers and
submodules the model had then, and ran the hooks it had then. A parameter, buffer or
submodule replaced afterwards (`m.fc.weight = nn.Parameter(...)`, `m.fc = nn.Linear(...)`,
`.to(torch.bfloat16)` on a model with buffers, `load_state_dict(..., assign=True)`), or
a hook added or removed, would be silently ignored: a wrong number. `ModelSnapshot`
notices such a change at the next call so that the call can refuse it. The check runs
C-level loops over the module dicts: 0.08 ms for BERT-base's 228 modules on a 2-core
host. A hook added anywhere moves torch's global hook counter, so only then are the
hook tables compared key by key. Changes made in place (`weight.data = ...`,
`load_state_dict`, an optimizer's step, `requires_grad_`) keep the objects, and the
graphs see them. A Python attribute that the forward reads (Dropout's `p`, a
temperature) is baked into the capture and is not checked.
"""

from __future__ import annotations

import operator
import warnings

from torch import nn
from torch.utils.hooks import RemovableHandle

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


class ModelSnapshot:
    """The parameters, buffers, submodules and hooks of some modules, as they are now.

    Parameters
    ----------
    modules : (qualified name, module) pairs; each module's own tables are taken, not
        its children's (list the children too).
    """

    def __init__(self, modules: list[tuple[str, nn.Module]]):
        self._dicts, self._keys, self._values, self._names = [], [], [], []
        self._hooks, self._hook_owners = [], []
        for prefix, module in modules:
            for table in (module._parameters, module._buffers, module._modules):
                for key, value in table.items():
                    self._dicts.append(table)
                    self._keys.append(key)
                    self._values.append(value)
                    self._names.append(f"{prefix}.{key}" if prefix else key)
            for hooks in (module._forward_hooks, module._forward_pre_hooks, module._backward_hooks,
                          getattr(module, "_backward_pre_hooks", {})):
                self._hooks.append(hooks)
                self._hook_owners.append(prefix)
        self._hook_counts = list(map(len, self._hooks))
        self._hook_keys = [tuple(h) for h in self._hooks]
        self._hooks_made = RemovableHandle.next_id  # every hook registration anywhere moves it

    def change(self) -> str | None:
        """What changed since the snapshot, as a phrase ("'fc.weight' was replaced or
        removed"); None when nothing did."""
        if RemovableHandle.next_id != self._hooks_made or list(map(len, self._hooks)) != self._hook_counts:
            keys = [tuple(h) for h in self._hooks]
            if keys != self._hook_keys:
                owner = next(o for k, was, o in zip(keys, self._hook_keys, self._hook_owners) if k != was)
                return f"a hook of {f'module {owner!r}' if owner else 'the model'} was added or removed"
            self._hooks_made = RemovableHandle.next_id  # hooks of other modules
        now = list(map(dict.get, self._dicts, self._keys))
        if any(map(operator.is_not, now, self._values)):
            name = next(n for a, b, n in zip(now, self._values, self._names) if a is not b)
            return f"{name!r} was replaced or removed"
        return None
