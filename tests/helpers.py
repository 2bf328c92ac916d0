"""Shared test helpers: hook structure and outputs of a pipeline."""

import numpy as np
import torch

from offloadkit.testing import tiny_call_kwargs


def run(pipe, seed=0, **overrides):
    kwargs = tiny_call_kwargs(pipe, seed=seed)
    kwargs.update(overrides)
    return pipe(**kwargs).images


def model_components(pipe):
    return {n: m for n, m in pipe.components.items() if isinstance(m, torch.nn.Module)}


def hook_structure(pipe):
    """{component: (hook class is CpuOffload, execution device, predecessor's component name)} for top-level hooks."""
    from accelerate.hooks import CpuOffload

    models = model_components(pipe)
    names_by_id = {id(m): n for n, m in models.items()}
    structure = {}
    for name, module in models.items():
        hook = getattr(module, "_hf_hook", None)
        if hook is None:
            structure[name] = None
            continue
        previous = getattr(hook, "prev_module_hook", None)
        structure[name] = (
            isinstance(hook, CpuOffload),
            torch.device(hook.execution_device),
            names_by_id.get(id(previous.model)) if previous is not None else None,
        )
    return structure


def hooked_submodules(pipe):
    """Names of every module, at any depth, that carries an Accelerate hook."""
    found = []
    for name, module in model_components(pipe).items():
        for sub_name, sub in module.named_modules():
            if hasattr(sub, "_hf_hook") or hasattr(sub, "_old_forward"):
                found.append(f"{name}.{sub_name}".rstrip("."))
    return found


def assert_same_images(a, b):
    assert np.array_equal(a, b), f"images differ: max abs diff {np.abs(np.asarray(a) - np.asarray(b)).max()}"


def textual_inversion_case():
    """(embedding, expected images) for a `<cat>` token loaded into a tiny SD pipeline without offload."""
    from offloadkit.testing import tiny_pipeline

    embedding = torch.randn(32, generator=torch.Generator().manual_seed(1))
    plain = tiny_pipeline("sd")
    plain.load_textual_inversion({"<cat>": embedding.clone()}, token="<cat>")
    return embedding, run(plain, prompt="a <cat>")


GOLDEN_HARDWARE = "rtx-4090-24gb"  # nominal rates: the golden times change only when offloadkit's model does


def golden_predictions(architecture: str) -> dict:
    """Every built-in policy predicted for a built-in architecture at its family's usual call.

    30 steps, in the dtype the model ships in.

    A policy that does not apply (it names a component the pipeline lacks) is recorded with its error.
    """
    import offloadkit
    from offloadkit.prediction.replay import predict

    found = {}
    for policy in offloadkit.builtin_policies():
        try:
            found[policy] = predict(architecture, policy, hardware=GOLDEN_HARDWARE).to_dict()
        except offloadkit.PolicyError as exc:
            found[policy] = {"error": str(exc)}
    return found
