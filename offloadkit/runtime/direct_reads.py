"""Where per-layer streaming (Accelerate's hooks on each module's own forward) misses a read.

A layer's weights are on the device only while that layer's own `forward` runs;
everything else sees `meta` tensors. Models break that in a few recurring ways:

- a module's forward reads a child's tensor itself (`F.multi_head_attention_forward(...,
  self.out_proj.weight)` in `nn.MultiheadAttention`, HunyuanDiT's attention pool): found in
  the forward's source, that module is streamed whole;
- a forward calls a child's other method (`self.bottleneck.decode(x)` in StableAudio3's
  VAE): the child's hook onloads it around that method too;
- a forward pre-hook reads the module's tensors (`torch.nn.utils.weight_norm` recomputes
  `weight` from `weight_g`/`weight_v` before `forward`, so before the hook has put them
  there: silently wrong numbers): such pre-hooks are run after the weights arrive;
- the pipeline reads a component's tensor or `.device` outside any forward (AceStep's
  `condition_encoder.silence_latent`, EasyAnimate's `text_encoder.device`): found in the
  pipeline class's source, that tensor's owner stays on the device, and the component's
  `device` answers the execution device.
"""

from __future__ import annotations

import ast
import functools
import inspect
import textwrap

# Reading these of a meta tensor is harmless: they do not touch its data or its device.
_METADATA = {"dtype", "shape", "ndim", "size", "dim", "numel", "requires_grad", "is_floating_point"}
_CALLS = {"forward", "__call__", "to", "parameters", "named_parameters", "buffers", "modules", "named_modules",
          "children", "named_children", "get_submodule", "dtype", "config", "register_to_config"}
_DEFERRED = "_offloadkit_deferred_pre_hooks"
_ONLOADED = "_offloadkit_onloaded_methods"


@functools.lru_cache(maxsize=None)
def _chains(function) -> tuple:
    """(attribute chain after `self`, how it is used, called self-method names) in a function's source.

    A use is "call" (`self.a.b(...)`), "metadata" (`self.a.weight.dtype`) or "read".
    """
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(function)))
    except (OSError, TypeError, SyntaxError):
        return ()
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Attribute) or isinstance(parents.get(node), ast.Attribute):
            continue  # only the outermost attribute of each chain
        chain, inner = [], node
        while isinstance(inner, ast.Attribute):
            chain.append(inner.attr)
            inner = inner.value
        if not (isinstance(inner, ast.Name) and inner.id == "self"):
            continue
        chain.reverse()
        parent = parents.get(node)
        use = "call" if isinstance(parent, ast.Call) and parent.func is node else "read"
        if len(chain) > 1 and chain[-1] in _METADATA or _is_type_check(parent):
            use, chain = "metadata", chain[:-1] if chain[-1] in _METADATA else chain
        elif len(chain) > 1 and chain[-1] == "device" and _in_none_fallback(node, parents):
            use, chain = "metadata", chain[:-1]  # `if device is None: device = self.x.weight.device`: callers pass it
        found.append((tuple(chain), use))
    return tuple(found)


def _is_type_check(call) -> bool:
    return isinstance(call, ast.Call) and isinstance(call.func, ast.Name) and call.func.id == "isinstance"


def _in_none_fallback(node, parents) -> bool:
    """Whether `node` is in the body of an `if <name> is None:` (a default for an argument not passed)."""
    while node in parents:
        node = parents[node]
        test = getattr(node, "test", None)
        if isinstance(node, ast.If) and isinstance(test, ast.Compare) and isinstance(test.left, ast.Name) \
                and isinstance(test.ops[0], ast.Is) and isinstance(test.comparators[0], ast.Constant) \
                and test.comparators[0].value is None:
            return True
    return False


def _resolve(root, chain):
    """(module, last name) where `chain` walks submodules of `root` and ends on one attribute."""
    module = root
    for index, name in enumerate(chain):
        child = module._modules.get(name)
        if child is None:
            return module, chain[index:]
        module = child
    return module, ()


def _has_tensors(module) -> bool:
    return any(True for _ in module.parameters()) or any(True for _ in module.buffers())


def _methods(cls, name: str, seen: set):
    """The function `name` of `cls` and the self-methods it calls, transitively."""
    function = getattr(cls, name, None)
    function = getattr(function, "__wrapped__", function)
    if not inspect.isfunction(function) or function in seen:
        return
    seen.add(function)
    yield function
    for chain, use in _chains(function):
        if use == "call" and len(chain) == 1:
            yield from _methods(cls, chain[0], seen)


def _scan(module, function, whole: set, calls: set) -> None:
    """Sort what `function` (a method of `module`) does with its submodules' weights.

    A direct read of a submodule's tensor puts `module`'s class in `whole`; a call of a submodule's
    method other than forward that uses weights puts (submodule, method) in `calls`, and that method is
    scanned in turn (a direct read there makes the submodule's class whole).
    """
    for chain, use in _chains(function):
        owner, rest = _resolve(module, chain)
        if owner is module or use == "metadata" or not rest:
            continue
        if rest[0] in owner._parameters or rest[0] in owner._buffers:
            whole.add(type(module).__name__)
        elif use == "call" and len(rest) == 1 and rest[0] not in _CALLS and (owner, rest[0]) not in calls \
                and _uses_weights(owner, rest[0], set()):
            calls.add((owner, rest[0]))
            for method in _methods(type(owner), rest[0], set()):
                _scan(owner, method, whole, calls)


def _uses_weights(module, method: str, seen: set) -> bool:
    """Whether `module.method()` reads a tensor of `module`'s tree or runs one of its submodules."""
    for function in _methods(type(module), method, seen):
        for chain, use in _chains(function):
            owner, rest = _resolve(module, chain)
            if use == "metadata":
                continue
            if not rest:
                if use == "call" and owner is not module and _has_tensors(owner):
                    return True
            elif rest[0] in owner._parameters or rest[0] in owner._buffers:
                return True
            elif use == "call" and len(rest) == 1 and owner is not module and rest[0] not in _CALLS \
                    and _uses_weights(owner, rest[0], seen):
                return True
    return False


def direct_reads(module) -> tuple[list[str], list]:
    """(class names of the submodules to stream whole, Accelerate's `preload_module_classes`;
    (submodule, method) pairs called from a forward through a method other than forward)."""
    whole, calls = set(), set()
    for sub in module.modules():
        if _has_tensors(sub):
            for function in _methods(type(sub), "forward", set()):
                _scan(sub, function, whole, calls)
    return sorted(whole), sorted(calls, key=lambda pair: (id(pair[0]), pair[1]))


def whole_classes(module) -> list[str]:
    """Class names of the submodules to stream whole (their forward reads their children's tensors)."""
    return direct_reads(module)[0]


# --- methods other than forward -------------------------------------------------------------


def onload_in_methods(calls) -> None:
    """Each (submodule, method): the submodule's hook puts its weights there around the method too."""
    for owner, name in calls:
        hook = getattr(owner, "_hf_hook", None)
        if hook is None or name in owner.__dict__:
            continue  # no tensors of its own to stream (its children's hooks serve them), or done already
        method = getattr(owner, name)

        @functools.wraps(method)
        def onloaded(*args, _owner=owner, _hook=hook, _method=method, **kwargs):
            if any(t.device.type != "meta" for t in _owner.parameters(recurse=False)):
                return _method(*args, **kwargs)  # already there: called from inside the owner's own forward
            args, kwargs = _hook.pre_forward(_owner, *args, **kwargs)
            return _hook.post_forward(_owner, _method(*args, **kwargs))

        owner.__dict__[name] = onloaded
        owner.__dict__.setdefault(_ONLOADED, []).append(name)


def restore_methods(root) -> None:
    for module in root.modules():
        for name in module.__dict__.pop(_ONLOADED, ()):
            module.__dict__.pop(name, None)


# --- forward pre-hooks ------------------------------------------------------------------------


def defer_pre_hooks(modules) -> None:
    """Run the forward pre-hooks of streamed modules after their hook has put the weights there.

    What the pre-hooks set on the module (weight_norm's computed `weight`) is put back after the
    forward, so it does not stay on the device between calls.
    """
    for module in modules:
        hooks = dict(module._forward_pre_hooks)
        if not hooks or not hasattr(module, "_old_forward"):
            continue
        with_kwargs = {key for key in hooks if key in module._forward_pre_hooks_with_kwargs}
        module._forward_pre_hooks.clear()
        for key in with_kwargs:
            module._forward_pre_hooks_with_kwargs.pop(key, None)
        original = module._old_forward

        @functools.wraps(original)
        def forward(*args, _module=module, _hooks=hooks, _kwargs_hooks=with_kwargs, _original=original, **kwargs):
            before = dict(vars(_module))
            for key, hook in _hooks.items():
                if key in _kwargs_hooks:
                    result = hook(_module, args, kwargs)
                    if result is not None:
                        args, kwargs = result
                else:
                    result = hook(_module, args)
                    if result is not None:
                        args = result if isinstance(result, tuple) else (result,)
            try:
                return _original(*args, **kwargs)
            finally:
                for name, value in list(vars(_module).items()):
                    if name in before and before[name] is not value and _is_tensor(value):
                        setattr(_module, name, before[name])

        module._old_forward = forward
        setattr(module, _DEFERRED, (hooks, with_kwargs, original))


def restore_pre_hooks(root) -> None:
    """Undo `defer_pre_hooks` on every module of `root` (before Accelerate's hooks are removed)."""
    for module in root.modules():
        deferred = module.__dict__.pop(_DEFERRED, None)
        if deferred is None:
            continue
        hooks, with_kwargs, original = deferred
        module._old_forward = original
        module._forward_pre_hooks.update(hooks)
        for key in with_kwargs:
            module._forward_pre_hooks_with_kwargs[key] = True


def _is_tensor(value) -> bool:
    import torch

    return isinstance(value, torch.Tensor)


# --- reads by the pipeline ------------------------------------------------------------------


def pipeline_reads(pipe, name: str, module) -> tuple[list[str], bool]:
    """(paths of the submodules whose own tensors the pipeline reads, whether it reads `.device`) for
    component `name`, from the source of the pipeline class's methods."""
    owners, device = set(), False
    for cls in type(pipe).__mro__:
        if cls.__module__.startswith(("offloadkit.", "builtins")):
            continue
        for function in vars(cls).values():
            function = getattr(function, "__wrapped__", function)
            if not inspect.isfunction(function):
                continue
            for chain, use in _chains(function):
                if len(chain) < 2 or chain[0] != name:
                    continue
                if chain[1:] == ("device",):
                    device = True
                    continue
                owner, rest = _resolve(module, chain[1:])
                if use != "metadata" and rest and (rest[0] in owner._parameters or rest[0] in owner._buffers):
                    owners.add(next(path for path, sub in module.named_modules() if sub is owner))
    return sorted(owners), device


def report_device(module, device) -> None:
    """Make `module.device` answer the execution device (its parameters are on `meta` between forwards)."""
    cls = type(module)
    if not isinstance(getattr(cls, "device", None), property):
        return
    reported = type(cls.__name__, (cls,), {"device": property(lambda self: device), "__module__": cls.__module__,
                                           "__qualname__": cls.__qualname__, "_offloadkit_base": cls})
    module.__class__ = reported


def restore_device(module) -> None:
    base = type(module).__dict__.get("_offloadkit_base")
    if base is not None:
        module.__class__ = base
