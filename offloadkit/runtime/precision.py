"""Making the precision a policy declares: `storage_dtype` (layerwise casting) and `quantize` (int8 weights).

Both change a component's weights in place when the policy is applied, before any
offload hook is installed (a diffusers hook registered before Accelerate's survives
Accelerate's removal; one registered after does not). Both are kept by `remove()`:
casting weights back up would not bring back the precision they lost. What they
select and how much they weigh afterwards is planned in `offloadkit.plans.precision`.
"""

from __future__ import annotations

from ..errors import PipelineError
from ..plans.precision import castable_layers, produced_by, quantizable_layers
from ..plans.quantization import detect


def apply_precision(name: str, module, rule) -> None:
    """Make the precision change the rule asks for, unless the component already has it."""
    backend = rule.quantize_with  # resolved by the plan: torchao or quanto
    found = detect(module)
    storage = rule.storage_dtype
    if storage:
        if found is not None and found.backend == "layerwise_casting":
            if found.detail != f"stored as {storage}":
                raise PipelineError(f"{name!r} is already {found.label}; the policy asks for storage_dtype "
                                    f"{storage}. Reload the component to store it differently")
            return
        _cast_layers(module, storage, rule.compute_dtype)
    elif rule.quantize:
        if found is not None and produced_by(rule, found.backend, found.detail):
            return  # quantized by an earlier apply of this policy (remove() keeps it)
        if found is not None:
            raise PipelineError(f"{name!r} is already {found.label}; `quantize` applies to float weights. Remove "
                                "`quantize` from its rule")
        layers = quantizable_layers(module)
        if not layers:
            raise PipelineError(f"{name!r} has no Linear layer with float weights to quantize. Remove `quantize` "
                                "from its rule")
        if backend == "torchao":
            from torchao.quantization import Int8WeightOnlyConfig, quantize_

            chosen = {id(layer) for _, layer in layers}
            quantize_(module, Int8WeightOnlyConfig(), filter_fn=lambda m, fqn: id(m) in chosen)
        else:
            from optimum.quanto import freeze, qint8, quantize

            quantize(module, weights=qint8, include=[n for n, _ in layers])
            freeze(module)


def _cast_layers(module, storage: str, compute: str | None) -> None:
    import torch
    from diffusers.hooks.layerwise_casting import apply_layerwise_casting_hook

    if compute is None:
        compute_dtype = next((p.dtype for p in module.parameters() if p.is_floating_point()), torch.float32)
    else:
        compute_dtype = getattr(torch, compute)
    for _, layer in castable_layers(module):
        apply_layerwise_casting_hook(layer, getattr(torch, storage), compute_dtype, non_blocking=False)
    try:  # as apply_layerwise_casting does: peft layers must not cast their inputs to the storage dtype
        from diffusers.hooks.layerwise_casting import _disable_peft_input_autocast
    except ImportError:
        return
    _disable_peft_input_autocast(module)
