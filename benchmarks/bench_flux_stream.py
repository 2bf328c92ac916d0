"""`stream` on a FLUX.1-dev-sized transformer: against all resident, diffusers' group offloading and model offload.

Run through ``bench_gpu.py --flux`` (or directly); on a CUDA machine by ``benchmarks/gpu_session.sh``.
NOT RUN ON A GPU YET: no CUDA machine was lent since it was written. ``--config tiny --device cpu``
dry-runs every method that can run without CUDA.

The transformer is ``FluxTransformer2DModel`` built from the built-in FLUX.1-dev config
(``offloadkit/prediction/architectures/flux1-dev/transformer/config.json``: 19 double- and 38
single-stream blocks, 11.9B parameters, 23.8 GB in bf16) on ``meta`` and materialised with seeded
random bf16 weights (``bench_gpu._materialise``); the first method saves them to ``--cache`` as
safetensors and later ones load them. Inputs are those of a 1024x1024 call (4096 image tokens of 64
channels, 512 T5 tokens of 4096, a pooled CLIP vector of 768, guidance 3.5), seeded. A "call" is
``--steps`` transformer forwards (the denoising loop without the text encoders and the VAE, which
do not change between the methods).

Methods (each in its own process):

  resident            transformer.to(device): every block on the device (the reference output)
  stream-16g / -12g / -8g
                      offloadkit `stream` (resident: auto) under `budget: {device_memory: 16/12/8GiB}`
  group-block         diffusers apply_group_offloading(block_level, 1 block per group, use_stream,
                      record_stream)
  group-leaf          diffusers apply_group_offloading(leaf_level, use_stream, record_stream)
  model-offload       the whole transformer onloaded per call and offloaded after (what
                      enable_model_cpu_offload does to it)
  torchao-resident / torchao-stream-12g / torchao-model-offload
                      the transformer quantized with torchao int8 weight-only
  nf4-resident / nf4-stream-12g / nf4-model-offload
                      every Linear of its blocks as bitsandbytes NF4 (compute bf16)

Per method: median seconds per call over ``--calls`` calls after a warm-up (synchronised), peak VRAM
(max_memory_allocated), and for `stream`: bytes streamed per call, the exposed transfer per step
(the time the compute stream waited for copies, from CUDA events), the copy engine's achieved
host-to-device GB/s (streamed bytes over the copies' own time) against ``--pinned-gbs`` (calibrate's
pinned figure), and whether the output equals its resident counterpart's bit for bit. ``--repeat
N`` runs N more calls under stream-12g and checks the host weights are bit-identical after them.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import sys
import tempfile
import time
import warnings

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import benchkit  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "offloadkit", "prediction", "architectures", "flux1-dev", "transformer", "config.json")
TINY = dict(patch_size=1, in_channels=16, num_layers=2, num_single_layers=4, attention_head_dim=16,
            num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=16, guidance_embeds=True,
            axes_dims_rope=(4, 4, 8))
BUDGETS = {"stream-16g": "16GiB", "stream-12g": "12GiB", "stream-8g": "8GiB", "torchao-stream-12g": "12GiB",
           "nf4-stream-12g": "12GiB"}
METHODS = ("resident", "stream-16g", "stream-12g", "stream-8g", "group-block", "group-leaf", "model-offload",
           "torchao-resident", "torchao-stream-12g", "torchao-model-offload", "nf4-resident", "nf4-stream-12g",
           "nf4-model-offload")
NEEDS_CUDA = ("group-block", "group-leaf")
# With --config tiny (whose embedders weigh as much as its blocks) a budget is what streaming every block needs
# plus this share of the blocks' bytes: the dry run exercises `resident: auto` under a budget at three sizes.
TINY_SHARES = {"16GiB": 0.67, "12GiB": 0.50, "8GiB": 0.34}


def _config(name: str) -> dict:
    if name == "tiny":
        return dict(TINY)
    with open(CONFIG) as f:
        return {k: v for k, v in json.load(f).items() if not k.startswith("_")}


def build_transformer(config_name: str, seed: int, cache: str | None):
    import torch
    from accelerate import init_empty_weights
    from diffusers import FluxTransformer2DModel

    from bench_gpu import _materialise

    with init_empty_weights():
        model = FluxTransformer2DModel(**_config(config_name))
    path = os.path.join(cache, f"flux-{config_name}-{seed}.safetensors") if cache else None
    if path and os.path.isfile(path):
        from safetensors.torch import load_file

        model.load_state_dict(load_file(path), assign=True, strict=True)
        return model.eval().requires_grad_(False), "cache"
    _materialise(model, seed, torch.bfloat16)
    if path:
        from safetensors.torch import save_file

        os.makedirs(cache, exist_ok=True)
        save_file(model.state_dict(), path)
    return model, "built"


def make_inputs(config_name: str, seed: int, device):
    import torch

    tiny = config_name == "tiny"
    tokens, text = (64, 16) if tiny else (4096, 512)
    config = _config(config_name)
    generator = torch.Generator("cpu").manual_seed(seed + 1)

    def randn(*shape):
        return torch.randn(shape, generator=generator).to(device, torch.bfloat16)

    ids = torch.zeros(tokens, 3)
    side = int(tokens ** 0.5)
    ids[:, 1] = torch.arange(tokens) // side
    ids[:, 2] = torch.arange(tokens) % side
    return dict(hidden_states=randn(1, tokens, config["in_channels"]),
                encoder_hidden_states=randn(1, text, config["joint_attention_dim"]),
                pooled_projections=randn(1, config["pooled_projection_dim"]),
                timestep=torch.tensor([0.5], device=device, dtype=torch.bfloat16),
                guidance=torch.tensor([3.5], device=device, dtype=torch.bfloat16),
                img_ids=ids.to(device), txt_ids=torch.zeros(text, 3, device=device), return_dict=False)


def quantize(model, method: str, device):
    """torchao int8 weight-only, or bitsandbytes NF4 for every Linear of the blocks (quantized on the device)."""
    import torch

    if method.startswith("torchao"):
        from torchao.quantization import Int8WeightOnlyConfig, quantize_

        quantize_(model, Int8WeightOnlyConfig())
        return model
    if method.startswith("nf4"):
        import bitsandbytes as bnb

        for blocks in (model.transformer_blocks, model.single_transformer_blocks):
            for block in blocks:
                for parent in list(block.modules()):
                    for name, child in list(parent.named_children()):
                        if type(child) is torch.nn.Linear:
                            layer = bnb.nn.LinearNF4(child.in_features, child.out_features,
                                                     bias=child.bias is not None, compute_dtype=torch.bfloat16)
                            layer.weight = bnb.nn.Params4bit(child.weight.data, requires_grad=False,
                                                             quant_type="nf4")
                            if child.bias is not None:
                                layer.bias = torch.nn.Parameter(child.bias.data, requires_grad=False)
                            setattr(parent, name, layer.to(device).to("cpu"))  # quantized when moved
    return model


def setup(method: str, model, device, config_name: str):
    """(callable transformer, per-call begin, per-call end, handle or None)."""
    import torch

    nothing = lambda: None  # noqa: E731
    if method.endswith("resident"):
        return model.to(device), nothing, nothing, None
    if method.startswith("group"):
        from diffusers.hooks.group_offloading import apply_group_offloading

        level = "block_level" if method == "group-block" else "leaf_level"
        apply_group_offloading(model, onload_device=device, offload_device=torch.device("cpu"), offload_type=level,
                               num_blocks_per_group=1 if level == "block_level" else None, use_stream=True,
                               record_stream=True)
        return model, nothing, nothing, None
    if method.endswith("model-offload"):
        from accelerate import cpu_offload_with_hook

        model, hook = cpu_offload_with_hook(model, execution_device=device)
        return model, nothing, hook.offload, None
    import offloadkit
    from offloadkit.testing import tiny_pipeline

    pipe = tiny_pipeline("flux")  # the carrier: offloadkit applies policies to pipelines
    pipe.register_modules(transformer=model)
    budget = BUDGETS[method]
    if config_name == "tiny":
        least = offloadkit.plan(pipe, {"version": 1, "components": {"transformer": {
            "strategy": "stream", "resident": 0}}}, device=str(device)).component("transformer").stream
        budget = least.device_bytes + int(TINY_SHARES[budget] * least.streamed_bytes)
    policy = {"version": 1, "budget": {"device_memory": budget, "on_exceed": "error"},
              "components": {"transformer": {"strategy": "stream"}}}
    handle = offloadkit.apply(pipe, policy, device=str(device))
    return pipe.transformer, handle.begin_call, handle.end_call, handle


def fingerprint(tensor) -> str:
    return hashlib.sha256(tensor.float().cpu().contiguous().numpy().tobytes()).hexdigest()


def weights_sum(model) -> str:
    import torch

    digest = hashlib.sha256()
    for _, tensor in sorted(model.state_dict().items()):
        if tensor.dtype.is_floating_point:
            digest.update(torch.sum(tensor.float()).double().numpy().tobytes())
    return digest.hexdigest()


def child(args) -> int:
    import torch

    warnings.filterwarnings("ignore")
    device = torch.device(args.device)
    result = {"method": args.child, "ok": False}
    try:
        start = time.perf_counter()
        model, source = build_transformer(args.config, args.seed, args.cache)
        if args.child.split("-")[0] in ("torchao", "nf4"):
            model = quantize(model, args.child, device)
        result["build_s"], result["weights"] = time.perf_counter() - start, source
        start = time.perf_counter()
        module, begin, end, handle = setup(args.child, model, device, args.config)
        result["setup_s"] = time.perf_counter() - start
        inputs = make_inputs(args.config, args.seed, device)

        def call():
            begin()
            out = None
            with torch.no_grad():
                for _ in range(args.steps):
                    out = module(**inputs)[0]
            end()
            return out

        times, peaks, streams = [], [], []
        for index in range(args.calls + 1):
            if device.type == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            began = time.perf_counter()
            out = call()
            if device.type == "cuda":
                torch.cuda.synchronize()
                peaks.append(torch.cuda.max_memory_allocated())
            if index:
                times.append(time.perf_counter() - began)
            if handle is not None:
                streams.append(handle.trace.calls_summary()[-1].streams.get("transformer", {}))
        result.update(ok=True, per_call=statistics.median(times), seconds=times, peak_vram=max(peaks, default=None),
                      output=fingerprint(out))
        if handle is not None:
            last = streams[-1]
            result["stream"] = {**last, "layout": handle.plan.component("transformer").stream.summary(),
                                "exposed_per_step": last.get("exposed_seconds", 0) / args.steps,
                                "h2d_gbs": (last["bytes"] / last["copy_seconds"] / 1e9)
                                if last.get("copy_seconds") else None}
            if args.repeat and args.child == "stream-12g":
                before = weights_sum(model)
                for _ in range(args.repeat):
                    call()
                result["weights_identical_after"] = {"calls": args.repeat, "same": weights_sum(model) == before}
    except Exception as exc:  # reported: the other methods still run
        import traceback

        result["error"] = f"{type(exc).__name__}: {exc}"
        result["traceback"] = traceback.format_exc()[-3000:]
    with open(os.path.join(args.result_dir, "result.json"), "w") as f:
        json.dump(result, f)
    return 0


def report(results: dict, args) -> list:
    """The table and the issue's targets (PASS / FAIL / n/a)."""
    lines = [f"FLUX.1-dev-sized transformer ({args.config}), {args.steps} steps a call, {args.calls} calls after a "
             f"warm-up, on {args.device}",
             f"{'method':<22} {'s/call':>8} {'vs resident':>11} {'peak VRAM':>10} {'exposed/step':>12} "
             f"{'H2D GB/s':>9}  output"]
    resident = {k: results.get(k, {}) for k in ("resident", "torchao-resident", "nf4-resident")}
    for method, r in results.items():
        if not r.get("ok"):
            lines.append(f"{method:<22} failed: {r.get('error', '')[:160]}")
            continue
        base = resident[{"torchao": "torchao-resident", "nf4": "nf4-resident"}.get(method.split("-")[0],
                                                                                     "resident")]
        ratio = f"{r['per_call'] / base['per_call']:.2f}x" if base.get("ok") else "-"
        same = "-" if not base.get("ok") else ("same" if r["output"] == base["output"] else "DIFFERS")
        stream = r.get("stream", {})
        exposed = f"{stream['exposed_per_step'] * 1e3:.1f} ms" if stream else "-"
        rate = f"{stream['h2d_gbs']:.1f}" if stream.get("h2d_gbs") else "-"
        vram = f"{r['peak_vram'] / 2**30:.2f} GiB" if r.get("peak_vram") else "-"
        lines.append(f"{method:<22} {r['per_call']:>8.2f} {ratio:>11} {vram:>10} {exposed:>12} {rate:>9}  {same}"
                     + (f"  [{stream['layout']}]" if stream else ""))
    lines += ["", "targets:"]
    s12, res = results.get("stream-12g", {}), results.get("resident", {})
    groups = [results[k] for k in ("group-block", "group-leaf") if results.get(k, {}).get("ok")]

    def verdict(ok, text):
        lines.append(f"  {'PASS' if ok else 'FAIL' if ok is not None else 'n/a '}  {text}")

    if s12.get("ok") and res.get("ok"):
        ratio = s12["per_call"] / res["per_call"]
        verdict(ratio <= 1.25, f"stream at 12 GiB: {ratio:.2f}x all resident (target <= 1.25x)")
    else:
        verdict(None, "stream at 12 GiB vs all resident: not measured")
    if s12.get("ok") and groups:
        fastest = min(groups, key=lambda g: g["per_call"])
        speedup = fastest["per_call"] / s12["per_call"]
        lower = (s12.get("peak_vram") or 0) <= (fastest.get("peak_vram") or 0)
        verdict(speedup >= 2 and lower, f"stream at 12 GiB {speedup:.2f}x faster than diffusers' fastest group "
                                        f"offloading ({fastest['method']}), peak VRAM "
                                        f"{'not above' if lower else 'ABOVE'} it (target >= 2x, no more VRAM)")
    else:
        verdict(None, "stream vs diffusers group offloading: not measured")
    rate = s12.get("stream", {}).get("h2d_gbs")
    if rate and args.pinned_gbs:
        verdict(rate >= 0.85 * args.pinned_gbs, f"streamed copies at {rate:.1f} GB/s, "
                                                f"{rate / args.pinned_gbs:.0%} of calibrated pinned "
                                                f"{args.pinned_gbs:.1f} GB/s (target >= 85%)")
    else:
        verdict(None, "streamed copy bandwidth vs calibrated pinned: not measured (pass --pinned-gbs)")
    same = s12.get("weights_identical_after")
    verdict(same["same"] if same else None, f"weights bit-identical after {same['calls']} calls" if same else
            "weights after many calls: not measured (--repeat)")
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", choices=("flux1-dev", "tiny"), default="flux1-dev")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--calls", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=50, help="calls after which stream-12g's weights are checked")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache", default=os.path.join(tempfile.gettempdir(), "offloadkit-bench-weights"))
    parser.add_argument("--pinned-gbs", type=float, default=None, help="calibrate's pinned host-to-device GB/s")
    parser.add_argument("--child-timeout", type=float, default=300)
    parser.add_argument("--json")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--result-dir", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return child(args)
    import torch

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        print(f"unknown method(s) {', '.join(unknown)}; valid: {', '.join(METHODS)}", file=sys.stderr)
        return 2
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("no CUDA device: run with --config tiny --device cpu for a dry run")
        return 0
    results = {}
    for method in methods:
        if not args.device.startswith("cuda") and method in NEEDS_CUDA:
            results[method] = {"method": method, "ok": False, "error": "needs CUDA (skipped in a CPU dry run)"}
            continue
        folder = tempfile.mkdtemp(prefix=f"bench-flux-{method}-")
        command = [sys.executable, os.path.abspath(__file__), "--child", method, "--result-dir", folder,
                   "--config", args.config, "--device", args.device, "--steps", str(args.steps),
                   "--calls", str(args.calls), "--repeat", str(args.repeat), "--seed", str(args.seed),
                   "--cache", args.cache]
        results[method] = benchkit.run_child(method, command, folder, args.child_timeout)
        r = results[method]
        print(f"{method}: " + (f"{r['per_call']:.2f} s/call" if r.get("ok") else f"failed: {r.get('error')}"),
              flush=True)
        if args.json:  # after every method: a cut-short run keeps what it measured
            with open(args.json, "w") as f:
                json.dump({"args": vars(args), "results": results}, f, indent=2)
    lines = report(results, args)
    print("\n".join(lines))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "results": results, "report": lines}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
