"""The subclass a pipeline's class becomes while a policy is applied.

It routes the pipeline's own offload state to the `OffloadHandle`:
- `__call__` runs one call at a time (other threads wait) and the policy's end of call in a
  `finally` (also after an exception);
- `_execution_device` is the policy's device;
- diffusers' offload switches, `to(device)`, pickling, and weight-changing calls that would
  silently undo or lose the policy's work raise a clear error instead (or, in the exact
  sequence diffusers' loaders use, put the policy back).
Made once per pipeline class, with the same name and module.
"""

from __future__ import annotations

from ..errors import PipelineError

HANDLE_ATTR = "_offloadkit_handle"

_CLASSES: dict = {}


def offloaded_class(base):
    """A subclass of the pipeline class that routes end of call and execution device to the handle."""
    cached = _CLASSES.get(base)
    if cached is not None:
        return cached

    def __call__(self, *args, **kwargs):
        handle = self.__dict__[HANDLE_ATTR]
        with handle.serialised_call():
            handle.begin_call()
            try:
                return base.__call__(self, *args, **kwargs)
            finally:
                handle.end_call()

    def _execution_device(self):
        handle = self.__dict__.get(HANDLE_ATTR)
        if handle is not None and any(c.runs_on for c in handle.plan.components):
            return handle.device
        return base._execution_device.fget(self)

    def _reapply_or_refuse(switch):
        def method(self, *args, **kwargs):
            handle = self.__dict__[HANDLE_ATTR]
            # Loaders call the switch only after stripping offload hooks they found; with none to strip,
            # or all still in place, the call comes from the user.
            if not handle.has_hooks() or handle.hooks_intact():
                raise PipelineError(
                    f"this pipeline is under the offloadkit policy {handle.plan.policy!r}; {switch}() would "
                    "silently replace it. Call offloadkit.remove(pipe) first, or express the behaviour in the policy")
            # diffusers' LoRA / textual-inversion loaders remove offload hooks, load, and call the switch
            # again: put the policy back instead of diffusers' default.
            handle.reinstall()
        method.__name__ = switch
        return method

    def to(self, *args, **kwargs):
        import torch

        wants_device = kwargs.get("device") is not None or any(
            not isinstance(arg, torch.dtype) and arg is not None for arg in args)
        if wants_device:
            handle = self.__dict__[HANDLE_ATTR]
            raise PipelineError(
                f"this pipeline is under the offloadkit policy {handle.plan.policy!r}, which decides where each "
                "component lives; pipe.to(device) would silently undo it. Call offloadkit.remove(pipe) first, or "
                "change the policy's `device` (or pass device= to offloadkit.apply)")
        wants_dtype = kwargs.get("dtype") is not None or any(isinstance(arg, torch.dtype) for arg in args)
        handle = self.__dict__[HANDLE_ATTR]
        changed = [c.name for c in handle.plan.components if c.rule.precision_change]
        if wants_dtype and changed:
            raise PipelineError(
                f"{', '.join(map(repr, changed))} {'has its' if len(changed) == 1 else 'have their'} storage "
                f"precision set by the policy {handle.plan.policy!r} (`storage_dtype`/`quantize`); pipe.to(dtype) "
                "would cast those weights and break their forward. Set `compute_dtype` in the policy instead, or "
                "reload the components and apply again")
        return base.to(self, *args, **kwargs)

    def __reduce_ex__(self, protocol):
        raise PipelineError("a pipeline under an offloadkit policy cannot be pickled or copied (its hooks and "
                            "offloaded weights are not plain state). Call offloadkit.remove(pipe) first, then "
                            "apply the policy again to each copy")

    def save_pretrained(self, *args, **kwargs):
        handle = self.__dict__[HANDLE_ATTR]
        meta = handle.weights_off_model()
        if meta:
            raise PipelineError(f"{', '.join(map(repr, meta))} keep their weights off the model under the policy "
                                f"{handle.plan.policy!r} (as meta tensors or in the policy's own packed buffers), so they cannot be "
                                "saved as they are. "
                                "Call offloadkit.remove(pipe) first, save, then apply the policy again")
        return base.save_pretrained(self, *args, **kwargs)

    def _refuse_on_meta_weights(method_name):
        def method(self, *args, **kwargs):
            handle = self.__dict__[HANDLE_ATTR]
            meta = handle.weights_off_model()
            if meta:
                raise PipelineError(
                    f"{method_name}() would change the weights of {', '.join(map(repr, meta))}, which live off the "
                    f"model (as meta tensors or in packed buffers) under the policy {handle.plan.policy!r}: the "
                    "change would be lost "
                    "silently. Call offloadkit.remove(pipe) first, then apply the policy again")
            return getattr(base, method_name)(self, *args, **kwargs)
        method.__name__ = method_name
        return method

    def load_lora_weights(self, *args, **kwargs):
        handle = self.__dict__[HANDLE_ATTR]
        cast = [c.name for c in handle.plan.components if getattr(c.rule, "storage_dtype", None)]
        if cast:
            raise PipelineError(
                f"{', '.join(map(repr, cast))} {'stores its' if len(cast) == 1 else 'store their'} weights in a lower "
                f"precision under the policy "
                f"{handle.plan.policy!r} (`storage_dtype`); LoRA layers added now would be created in that dtype "
                "and lose their precision or fail (diffusers' layerwise casting does the same). Load the LoRA "
                "into a freshly loaded component, then apply the policy: its layers are cast, the LoRA layers "
                "are left as they are")
        return base.load_lora_weights(self, *args, **kwargs)

    namespace = {
        "__call__": __call__,
        "to": to,
        "__reduce_ex__": __reduce_ex__,
        "save_pretrained": save_pretrained,
        "_execution_device": property(_execution_device),
        "enable_model_cpu_offload": _reapply_or_refuse("enable_model_cpu_offload"),
        "enable_sequential_cpu_offload": _reapply_or_refuse("enable_sequential_cpu_offload"),
        "_offloadkit_base_class": base,
        "__module__": base.__module__,
        "__qualname__": base.__qualname__,
        "__doc__": base.__doc__,
    }
    if hasattr(base, "load_lora_weights"):
        namespace["load_lora_weights"] = load_lora_weights
    for name in ("fuse_lora", "unfuse_lora"):
        if hasattr(base, name):
            namespace[name] = _refuse_on_meta_weights(name)
    cls = type(base)(base.__name__, (base,), namespace)
    _CLASSES[base] = cls
    return cls
