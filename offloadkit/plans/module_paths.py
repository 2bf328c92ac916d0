"""Module names a rule gives (`block_modules`), checked against the loaded model.

diffusers' group offloading matches `block_modules` against the *direct children* of the
model, and again against the children of each module it matched (one name per level, no
dots). A name that matches nothing is silently ignored, and a model whose blocks are nested
then loads as one group: the whole model on the device. So every name must match, and a
`block_level` rule must find some blocks.
"""

from __future__ import annotations

from ..errors import did_you_mean


def _is_blocks(module) -> bool:
    import torch

    return isinstance(module, (torch.nn.ModuleList, torch.nn.Sequential)) and len(module) > 0


def _matched(module, names: set[str], lists: list) -> tuple[set[str], bool]:
    """(names matched at some level, whether any blocks are found), walking as group offloading does.

    Matched names that are themselves block lists go to `lists`: their items would form one group.
    """
    matched, found = set(), False
    for child_name, child in module.named_children():
        if child_name in names:
            matched.add(child_name)
            if _is_blocks(child):
                lists.append(child_name)
            inner, inner_found = _matched(child, names, lists)
            matched |= inner
            found = found or inner_found
        elif _is_blocks(child):
            found = True
    return matched, found


def _path_to_blocks(module, prefix: tuple[str, ...] = (), depth: int = 4) -> tuple[str, ...] | None:
    """The names leading to the shallowest ModuleList/Sequential, e.g. ('encoder',) for T5's encoder.block."""
    level = [(prefix + (n,), c) for n, c in module.named_children()]
    for path, child in level:
        if _is_blocks(child):
            return path[:-1]
    if depth:
        for path, child in level:
            found = _path_to_blocks(child, path, depth - 1)
            if found is not None:
                return found
    return None


def block_modules_problem(name: str, module, rule) -> tuple[str | None, str | None]:
    """(problem, note) for a rule's `block_modules` on this model.

    A problem when the rule names modules that match nothing, or that find no blocks; a note (for the
    plan's reason) when the rule names none and the model's own setting finds no blocks.
    """
    if module is None or not hasattr(rule, "block_modules"):
        return None, None
    wanted = rule.block_modules if rule.block_modules is not None else \
        getattr(module, "_group_offload_block_modules", None)
    explicit = rule.block_modules is not None
    if getattr(rule, "offload_type", "block_level") != "block_level":
        return None, None
    suggestion = _path_to_blocks(module)
    if suggestion:
        hint = f"Set `block_modules: [{', '.join(suggestion)}]` (its blocks are nested under {'.'.join(suggestion)})"
    else:
        hint = "Use `offload_type: leaf_level` instead" if suggestion is None else "Remove `block_modules`"
    names = set(wanted or ())
    lists: list = []
    matched, found = _matched(module, names, lists)
    for missing in sorted(names - matched) if explicit else ():
        if "." in missing:
            try:
                target = module.get_submodule(missing)
            except AttributeError:
                return (f"{name!r} ({type(module).__name__}) has no submodule {missing!r}, and `block_modules` "
                        f"entries name one child module at one level, not a path. {hint}"), None
            # the list of blocks itself is found by the walk, not named
            parts = missing.split(".")[:-1] if _is_blocks(target) else missing.split(".")
            return (f"{name!r}: `block_modules` entry {missing!r} has a dot, but each entry names one child "
                    f"module at one level (diffusers matches names, not paths). Write the path as entries: "
                    f"`block_modules: [{', '.join(parts)}]`"), None
        children = [n for n, _ in module.named_children()]
        return (f"{name!r} ({type(module).__name__}) has no submodule {missing!r} where `block_modules` looks "
                f"(its direct children, then the children of each one named). "
                + did_you_mean(missing, children, "children")), None
    if explicit and lists:
        return (f"{name!r}: `block_modules` entry {lists[0]!r} is itself a list of blocks, so its items would load "
                "as one group. Name the module that holds it instead (block_level groups the lists it finds "
                "among the children of the modules named)"), None
    if not found:
        message = (f"`offload_type: block_level` finds no blocks in {type(module).__name__} (no ModuleList or "
                   f"Sequential {'under the `block_modules` named' if names else 'among its direct children'}), "
                   f"so the whole model loads as one group. {hint}")
        return (f"{name!r}: {message}", None) if explicit else (None, message)
    return None, None
