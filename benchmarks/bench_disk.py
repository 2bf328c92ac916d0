"""Benchmark: offloadkit's `disk` strategy vs Accelerate's and diffusers' disk offloading, on CPU.

What it measures, for one mid-size random-weight model -- an SD 1.5-sized
``UNet2DConditionModel`` built from its config (block_out_channels
(320, 640, 1280, 1280), layers_per_block 2, cross_attention_dim 768,
attention_head_dim 8, sample_size 64: about 860M parameters, fp32, ~3.2 GiB) --
with the weights offloaded to files on disk by three methods:

A. ``offloadkit``  -- ``offloadkit.apply(pipe, {"version": 1, "components": {"unet":
   {"strategy": "disk", "folder": DIR}}}, device="cpu")``. offloadkit applies
   policies to pipelines, so the UNet is put into a tiny SD pipeline
   (``offloadkit.testing.tiny_pipeline("sd")`` + ``pipe.register_modules(unet=unet)``);
   the UNet itself is then called directly.
B. ``accelerate``  -- ``accelerate.disk_offload(unet, offload_dir=DIR, execution_device="cpu")``
   (one numpy memmap ``.dat`` file per tensor, read and copied at each layer's forward).
C. ``diffusers``   -- ``apply_group_offloading(unet, onload_device="cpu", offload_device="cpu",
   offload_type="block_level", num_blocks_per_group=1, offload_to_disk_path=DIR)``
   (one safetensors file per group, ``load_file`` at each group's forward).

(``--with-plain`` adds ``plain``: the UNet kept in RAM, no offloading; a reference row
only, not part of the targets.)

For each method: the RSS of the process and the time of one UNet forward (latents
(1,4,64,64) for sd15, (1,4,32,32) for small; timestep 10; encoder_hidden_states
(1,77,768|256)), median over ``--calls`` timed calls after one warm-up call.

* "build"       -- RSS once the UNet is built in RAM. The random init needs real memory,
                   so this is ~model size for every method: all three start from the same
                   in-RAM model (as after from_pretrained); it is printed once.
* "setup peak"  -- max RSS before the first call (build + the method's setup):
                   ``resource.getrusage(RUSAGE_SELF).ru_maxrss`` read just before it.
* "after setup" -- VmRSS right after setup (after gc.collect()): the offloaded model at rest.
* "warm-up peak", "call peak" -- the exact peak of the warm-up call and of the timed
                   calls: the kernel's high-water mark (VmHWM) reset at the start of the
                   phase by writing 5 to /proc/self/clear_refs. (That reset also lowers
                   what ru_maxrss reports afterwards, hence ru_maxrss is read before it;
                   "proc. peak" = max of setup, warm-up and call peaks = the lifetime peak.)
                   Where clear_refs is refused, these fall back to the sampler below and
                   proc. peak to ru_maxrss at the end.
* A background thread also samples /proc/self/status every ~5 ms (VmRSS with its
  RssAnon / RssFile parts) for the anonymous vs file-backed split of each phase's peak;
  it can miss spikes that last a few ms (attention buffers), so the exact peaks above
  are the ones compared.

It also checks that the three methods compute the same thing: the output of the
last call of each method is compared with every other (max abs diff and
``torch.allclose(rtol=1e-4, atol=1e-4 * max|out|)``), and each method's calls with
each other. A method whose output differs is named.

Why subprocesses: peak RSS (``ru_maxrss``, VmHWM) is a per-process high-water mark,
and freed memory is not always given back to the OS (glibc keeps heap pages), so
methods measured in one process would mix. Each method runs in its own fresh
child process (``--child``) with the same seed, so the weights are bit-identical,
and with the same imports (torch, diffusers, accelerate, transformers, offloadkit)
and the same tiny SD pipeline built (only offloadkit uses it, as the UNet's carrier),
so that overhead is the same for all. Each method gets a fresh folder under
``--tmp`` (default /tmp/benchdisk), deleted after its child ends.

Note on RSS: /proc RSS includes file-backed pages of memory-mapped files that the
process has touched (RssFile). A method that reads weights through a long-lived
mmap (offloadkit's safetensors file) keeps those pages counted in its RSS, while
one that copies from short-lived maps (Accelerate) or re-maps per group
(diffusers) shows them only briefly. Clean file-backed pages are reclaimable page
cache (the kernel can drop them without swap), unlike anonymous memory, so the
table shows RssAnon and RssFile apart. Page cache filled by reading/writing the
files is not in any method's RSS.

Allocator note (glibc): the activations of a call are plain malloc'd memory. glibc's mmap
threshold starts at 128 KiB but rises to the size of any freed mmapped chunk (up to 32 MiB):
freeing the in-RAM model at setup lifts it to ~26 MiB, after which most activations come from
the brk heap, whose freed pages stay resident (RssAnon) and whose extent can grow from call to
call. How much it grows differs between runs and methods, which is most of the spread of the
call peaks. The "anon at calls start / end" and "glibc free" columns show it; with
``--malloc-env MALLOC_MMAP_THRESHOLD_=1048576`` (any fixed threshold turns the dynamic rise
off) every child, all methods alike, gets that setting and the header says so. It trades
resident heap for more page faults (fresh zeroed pages for each large activation). By default
the children get glibc's defaults, as a user's process would.

How to run (from the repository root)::

    .venv/bin/python benchmarks/bench_disk.py --size small          # smoke run, ~1 min
    .venv/bin/python benchmarks/bench_disk.py                       # sd15, a few minutes
    .venv/bin/python benchmarks/bench_disk.py --calls 2 --json /tmp/benchdisk/sd15.json
    .venv/bin/python benchmarks/bench_disk.py --size small --hook-timing   # where the time goes
    .venv/bin/python benchmarks/bench_disk.py --size small --profile       # cProfile of the calls
    .venv/bin/python benchmarks/bench_disk.py --malloc-env MALLOC_MMAP_THRESHOLD_=1048576  # fixed threshold

Options: ``--size sd15|small``, ``--calls N`` (default 3), ``--threads N`` (torch
intra-op threads in the children, default 2), ``--seed``, ``--methods`` (comma
list, default offloadkit,accelerate,diffusers), ``--with-plain``, ``--malloc-env MALLOC_NAME=VALUE`` (glibc malloc variable for every child), ``--hook-timing``
(time spent inside the offload hooks, per method), ``--profile`` (cProfile of the
timed calls; slows the calls), ``--tmp DIR``, ``--json PATH``.

Targets (from the issue): offloadkit's peak RSS no higher than either Accelerate's
or diffusers', and its time per call no slower than the faster of the two. PASS/FAIL
is printed for each. On this kind of machine (2 shared CPU cores) absolute times are
noisy; compare the ratios. The script is a measurement, not a test: it always exits 0.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import resource
import statistics
import sys
import tempfile
import threading
import time
import traceback
import warnings

import benchkit
from benchkit import malloc_info, read_status, reset_hwm, ru_maxrss_bytes

GIB = 1024 ** 3

SIZES = {
    "sd15": {
        "config": dict(block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, cross_attention_dim=768,
                       attention_head_dim=8, sample_size=64),
        "latents": (1, 4, 64, 64),
        "context": (1, 77, 768),
    },
    "small": {
        "config": dict(block_out_channels=(64, 128, 256, 256), layers_per_block=2, cross_attention_dim=256,
                       attention_head_dim=8, sample_size=32),
        "latents": (1, 4, 32, 32),
        "context": (1, 77, 256),
    },
}
METHODS = ("offloadkit", "accelerate", "diffusers")
BASELINES = ("accelerate", "diffusers")
TIMESTEP = 10
LABELS = {
    "offloadkit": "A offloadkit disk",
    "accelerate": "B accelerate disk_offload",
    "diffusers": "C diffusers group->disk",
    "plain": "- plain (no offload)",
}


# ------------------------------------------------------------------------------------------------
# RSS sampling (child side)
# ------------------------------------------------------------------------------------------------

class RssSampler(threading.Thread):
    """Samples /proc/self/status every `interval` s and keeps, per phase, the peak VmRSS (and its parts)."""

    def __init__(self, interval: float = 0.005):
        super().__init__(daemon=True)
        self.interval = interval
        self.phase_name = "start"
        self.peaks: dict = {}
        self.samples = 0
        self._halt = threading.Event()
        self._lock = threading.Lock()

    def _record(self, status: dict) -> None:
        with self._lock:
            peak = self.peaks.setdefault(self.phase_name, {"VmRSS": 0, "RssAnon": 0, "RssFile": 0,
                                                           "RssAnon_at_peak": 0, "RssFile_at_peak": 0})
            if status["VmRSS"] > peak["VmRSS"]:
                peak["VmRSS"] = status["VmRSS"]
                peak["RssAnon_at_peak"] = status.get("RssAnon", 0)
                peak["RssFile_at_peak"] = status.get("RssFile", 0)
            peak["RssAnon"] = max(peak["RssAnon"], status.get("RssAnon", 0))
            peak["RssFile"] = max(peak["RssFile"], status.get("RssFile", 0))
            self.samples += 1

    def phase(self, name: str) -> None:
        """Start a new phase; the current RSS is recorded at both ends so no phase is empty."""
        now = read_status()
        self._record(now)
        with self._lock:
            self.phase_name = name
        self._record(now)

    def run(self) -> None:
        while not self._halt.is_set():
            self._record(read_status())
            time.sleep(self.interval)

    def stop(self) -> None:
        self._record(read_status())
        self._halt.set()
        self.join()


# ------------------------------------------------------------------------------------------------
# Hook timing (child side, --hook-timing): wall time spent inside the offload hooks
# ------------------------------------------------------------------------------------------------

class HookTimer:
    def __init__(self):
        self.totals: dict = {}
        self.enabled = False

    def wrap(self, owner, attr: str, label: str) -> None:
        original = getattr(owner, attr)
        timer = self

        def wrapper(*args, **kwargs):
            if not timer.enabled:
                return original(*args, **kwargs)
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                entry = timer.totals.setdefault(label, [0.0, 0])
                entry[0] += time.perf_counter() - start
                entry[1] += 1

        wrapper.__wrapped__ = original
        setattr(owner, attr, wrapper)

    def reset(self) -> None:
        self.totals = {}


def install_hook_timers(method: str, timer: HookTimer) -> None:
    if method in ("offloadkit", "accelerate"):
        from accelerate.hooks import AlignDevicesHook

        timer.wrap(AlignDevicesHook, "pre_forward", "AlignDevicesHook.pre_forward (weights_map[...] + set tensors)")
        timer.wrap(AlignDevicesHook, "post_forward", "AlignDevicesHook.post_forward (back to meta)")
        if method == "offloadkit":
            from offloadkit.runtime.disk_store import DiskWeights

            timer.wrap(DiskWeights, "__getitem__", "  of which DiskWeights.__getitem__ (get_tensor [+clone])")
        else:
            from accelerate.utils.offload import OffloadedWeightsLoader

            timer.wrap(OffloadedWeightsLoader, "__getitem__",
                       "  of which OffloadedWeightsLoader.__getitem__ (memmap + copy)")
    elif method == "diffusers":
        from diffusers.hooks.group_offloading import ModuleGroup

        timer.wrap(ModuleGroup, "onload_", "ModuleGroup.onload_ (safetensors load_file)")
        timer.wrap(ModuleGroup, "offload_", "ModuleGroup.offload_ (empty_like placeholders)")


# ------------------------------------------------------------------------------------------------
# The methods (child side)
# ------------------------------------------------------------------------------------------------

def build_unet(size: str, seed: int):
    import torch
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    model = UNet2DConditionModel(**SIZES[size]["config"])
    return model.eval().requires_grad_(False)


def make_inputs(size: str, seed: int):
    import torch

    generator = torch.Generator("cpu").manual_seed(seed + 1)
    sample = torch.randn(SIZES[size]["latents"], generator=generator)
    context = torch.randn(SIZES[size]["context"], generator=generator)
    return sample, torch.tensor(TIMESTEP), context


def setup_method(method: str, model, folder: str, pipe):
    """Offload `model` with `method`; returns (module to call, objects to keep alive).

    `pipe` is the tiny SD pipeline every child builds (so its few MiB are in every method's RSS);
    only offloadkit uses it, as the carrier of the UNet.
    """
    import torch

    if method == "offloadkit":
        import offloadkit

        pipe.register_modules(unet=model)
        assert pipe.unet is model and pipe.components["unet"] is model
        policy = {"version": 1, "components": {"unet": {"strategy": "disk", "folder": folder,
                                                        "granularity": GRANULARITY}}}
        handle = offloadkit.apply(pipe, policy, device="cpu")
        return pipe.unet, (pipe, handle)
    if method == "accelerate":
        from accelerate import disk_offload

        disk_offload(model, offload_dir=folder, execution_device=torch.device("cpu"))
        return model, ()
    if method == "diffusers":
        from diffusers.hooks.group_offloading import apply_group_offloading

        apply_group_offloading(model, onload_device=torch.device("cpu"), offload_device=torch.device("cpu"),
                               offload_type="block_level", num_blocks_per_group=1, offload_to_disk_path=folder)
        return model, ()
    if method == "plain":
        return model, ()
    raise ValueError(f"unknown method {method!r}")


def folder_bytes(folder: str) -> int:
    total = 0
    for root, _, files in os.walk(folder):
        for name in files:
            try:
                total += os.path.getsize(os.path.join(root, name))
            except OSError:
                pass
    return total


def faults() -> tuple[int, int]:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_minflt, usage.ru_majflt


def child_main(args) -> int:
    global GRANULARITY
    GRANULARITY = args.granularity
    warnings.filterwarnings("ignore")
    result = {"method": args.child, "ok": False}
    out_dir = args.result_dir
    sampler = RssSampler(interval=args.sample_ms / 1000.0)
    # diagnostics: RSS split and glibc allocator totals at points of the run
    result["snapshots"] = snapshots = []

    def snap(label):
        status = read_status()
        snapshots.append({"at": label, "RssAnon": status.get("RssAnon"), "RssFile": status.get("RssFile"),
                          "VmHWM": status.get("VmHWM"), **{f"malloc_{k}": v for k, v in malloc_info().items()}})

    sampler.start()
    try:
        import torch

        # Same imports in every child, so import overhead is the same for all methods.
        import accelerate  # noqa: F401
        import diffusers  # noqa: F401
        import diffusers.hooks.group_offloading  # noqa: F401
        import transformers  # noqa: F401
        from diffusers.utils import logging as diffusers_logging

        import offloadkit  # noqa: F401
        import offloadkit.runtime.install  # noqa: F401
        import offloadkit.testing  # noqa: F401

        diffusers_logging.set_verbosity_error()
        if args.threads > 0:
            torch.set_num_threads(args.threads)
        result["threads"] = torch.get_num_threads()
        # offloadkit applies policies to pipelines: its UNet rides in a tiny SD pipeline. Every child builds
        # that pipeline (a few MiB), so it weighs the same in every method's RSS.
        harness = offloadkit.testing.tiny_pipeline("sd", seed=args.seed)
        result["rss_after_imports"] = read_status()["VmRSS"]

        timer = HookTimer()
        if args.hook_timing and args.child != "plain":
            install_hook_timers(args.child, timer)

        # --- build (in RAM; the same seed in every child gives bit-identical weights) -----------------
        sampler.phase("build")
        start = time.perf_counter()
        model = build_unet(args.size, args.seed)
        result["build_s"] = time.perf_counter() - start
        result["parameters"] = sum(p.numel() for p in model.parameters())
        result["weights_bytes"] = sum(t.numel() * t.element_size() for t in model.state_dict().values())
        gc.collect()
        result["rss_after_build"] = read_status()["VmRSS"]
        snap("after_build")

        # --- setup ------------------------------------------------------------------------------------
        folder = os.path.join(out_dir, "offload")
        sampler.phase("setup")
        start = time.perf_counter()
        module, keep = setup_method(args.child, model, folder, harness)
        del model
        gc.collect()
        result["setup_s"] = time.perf_counter() - start
        status = read_status()
        result["rss_after_setup"] = status["VmRSS"]
        result["rss_after_setup_anon"] = status.get("RssAnon", 0)
        result["rss_after_setup_file"] = status.get("RssFile", 0)
        snap("after_setup")
        result["disk_bytes"] = folder_bytes(folder) if os.path.isdir(folder) else 0
        result["disk_files"] = sum(len(f) for _, _, f in os.walk(folder)) if os.path.isdir(folder) else 0

        sample, timestep, context = make_inputs(args.size, args.seed)

        def call():
            with torch.no_grad():
                return module(sample, timestep, encoder_hidden_states=context).sample

        # The exact peak before the first call: the lifetime high-water mark so far (nothing was reset yet).
        result["ru_maxrss_before_calls"] = ru_maxrss_bytes()
        result["hwm_before_calls"] = read_status().get("VmHWM")

        # --- warm-up ----------------------------------------------------------------------------------
        sampler.phase("warmup")
        gc.collect()
        # From here the high-water mark is reset at the start of each phase, so VmHWM at its end is the
        # exact peak of that phase (the sampler can miss millisecond spikes such as attention buffers).
        exact = reset_hwm()
        result["hwm_exact"] = exact
        flt0 = faults()
        start = time.perf_counter()
        first = call()
        result["warmup_s"] = time.perf_counter() - start
        flt1 = faults()
        result["warmup_faults"] = {"minor": flt1[0] - flt0[0], "major": flt1[1] - flt0[1]}
        result["hwm_warmup"] = read_status().get("VmHWM") if exact else None
        snap("after_warmup")

        # --- timed calls ------------------------------------------------------------------------------
        profiler = None
        if args.profile:
            import cProfile

            profiler = cProfile.Profile()
        timer.reset()
        timer.enabled = True
        times, minor, major, cpu_s = [], [], [], []
        out = first
        sampler.phase("calls")
        gc.collect()
        if exact:
            reset_hwm()
        snap("calls_start")
        for _ in range(args.calls):
            gc.collect()
            f0 = faults()
            cpu0 = time.process_time()
            if profiler is not None:
                profiler.enable()
            start = time.perf_counter()
            out = call()
            elapsed = time.perf_counter() - start
            if profiler is not None:
                profiler.disable()
            f1 = faults()
            cpu_s.append(time.process_time() - cpu0)
            times.append(elapsed)
            minor.append(f1[0] - f0[0])
            snap("after_call")
            major.append(f1[1] - f0[1])
        result["hwm_calls"] = read_status().get("VmHWM") if exact else None
        sampler.phase("end")
        timer.enabled = False
        result["call_s"] = times
        result["call_cpu_s"] = cpu_s  # CPU time of the process per call (all threads): less noisy than wall
        result["call_faults_minor"] = minor
        result["call_faults_major"] = major
        result["calls_identical"] = bool(torch.equal(first, out))
        per_call = max(1, args.calls)
        result["hook_timing"] = {k: {"total_s_per_call": v[0] / per_call, "count_per_call": v[1] // per_call}
                                 for k, v in timer.totals.items()}
        torch.save(out.detach().clone(), os.path.join(out_dir, "output.pt"))
        if profiler is not None:
            import io
            import pstats

            stream = io.StringIO()
            stats = pstats.Stats(profiler, stream=stream)
            stats.sort_stats("tottime").print_stats(args.profile_top)
            result["profile_tottime"] = stream.getvalue()
            stream = io.StringIO()
            stats = pstats.Stats(profiler, stream=stream)
            stats.sort_stats("cumulative").print_stats(args.profile_top)
            result["profile_cumulative"] = stream.getvalue()
        del keep
        result["ok"] = True
    except BaseException as exc:  # reported by the parent; the benchmark goes on with the other methods
        result["error"] = f"{type(exc).__name__}: {exc}"
        result["traceback"] = traceback.format_exc()
    finally:
        sampler.stop()
        result["ru_maxrss"] = ru_maxrss_bytes()
        result["vm_hwm"] = read_status().get("VmHWM", 0)
        result["rss_samples"] = sampler.samples
        result["peaks"] = sampler.peaks
        with open(os.path.join(out_dir, "result.json"), "w") as f:
            json.dump(result, f)
    return 0


# ------------------------------------------------------------------------------------------------
# Parent: run each method in a fresh process, compare, report
# ------------------------------------------------------------------------------------------------

def _parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="sd15", choices=tuple(SIZES),
                        help="sd15: SD 1.5-sized UNet (~860M params); small: a fast smoke run (default: sd15)")
    parser.add_argument("--calls", type=int, default=3, help="timed calls per method, after 1 warm-up (default: 3)")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads in the children (default: 2)")
    parser.add_argument("--granularity", choices=("layer", "block"), default="layer",
                        help="offloadkit disk `granularity` (default: layer)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--methods", default=",".join(METHODS),
                        help=f"comma-separated subset of {','.join(METHODS)} (default: all three)")
    parser.add_argument("--with-plain", action="store_true",
                        help="also run the UNet with no offloading (a reference row; not part of the targets)")
    parser.add_argument("--hook-timing", action="store_true",
                        help="time the offload hooks (pre/post forward, weight reads) during the timed calls")
    parser.add_argument("--profile", action="store_true",
                        help="cProfile the timed calls in each child and print the top functions (slows the calls)")
    parser.add_argument("--profile-top", type=int, default=25, help=argparse.SUPPRESS)
    parser.add_argument("--sample-ms", type=float, default=5.0, help="RSS sampling interval in ms (default: 5)")
    parser.add_argument("--time-tol", type=float, default=0.0,
                        help="slack allowed on the time target, as a fraction (default: 0 = strict)")
    parser.add_argument("--rss-tol", type=float, default=0.0,
                        help="slack allowed on the RSS targets, as a fraction (default: 0 = strict)")
    parser.add_argument("--malloc-env", action="append", default=[], metavar="MALLOC_NAME=VALUE",
                        help="set this glibc malloc variable in every child, all methods alike (repeatable); "
                        "e.g. MALLOC_MMAP_THRESHOLD_=1048576. Default: none (glibc's defaults)")
    parser.add_argument("--tmp", default="/tmp/benchdisk", help="parent folder of the per-method temp folders")
    parser.add_argument("--child-timeout", type=float, default=1800.0, help=argparse.SUPPRESS)
    parser.add_argument("--json", dest="json_path", default=None, help="write all numbers to this JSON file")
    # internal: run one method in this (child) process
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--result-dir", default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


GRANULARITY = "layer"  # set from --granularity in the child


def run_child(method: str, args) -> dict:
    os.makedirs(args.tmp, exist_ok=True)
    folder = tempfile.mkdtemp(prefix=f"{method}-", dir=args.tmp)
    command = [sys.executable, os.path.abspath(__file__), "--child", method, "--result-dir", folder,
               "--size", args.size, "--calls", str(args.calls), "--threads", str(args.threads),
               "--seed", str(args.seed), "--sample-ms", str(args.sample_ms), "--profile-top", str(args.profile_top),
               "--granularity", args.granularity]
    if args.hook_timing:
        command.append("--hook-timing")
    if args.profile:
        command.append("--profile")
    return benchkit.run_child(method, command, folder, args.child_timeout, "output.pt", _load_tensor,
                              extra_env=malloc_env(args))


def malloc_env(args) -> dict:
    """The environment variables given to every child (all three methods alike) by --malloc-env."""
    env = {}
    for item in args.malloc_env:
        key, sep, value = item.partition("=")
        if not sep or not key.startswith("MALLOC_"):
            raise SystemExit(f"--malloc-env wants MALLOC_NAME=VALUE, got {item!r}")
        env[key] = value
    return env


def _load_tensor(path):
    import torch

    return torch.load(path)


def summarise(result: dict) -> dict:
    peaks = result.get("peaks", {})

    def peak(*phases, key="VmRSS"):
        values = [peaks[p][key] for p in phases if p in peaks]
        return max(values) if values else None

    # "sampled": the 5 ms sampler; "exact": the kernel's high-water mark (ru_maxrss / VmHWM of the phase).
    result["setup_peak_sampled"] = peak("build", "setup")
    result["warmup_peak_sampled"] = peak("warmup")
    result["call_peak_sampled"] = peak("calls")
    exact = bool(result.get("hwm_exact"))
    result["setup_peak"] = result.get("ru_maxrss_before_calls") or result["setup_peak_sampled"]
    result["warmup_peak"] = result["hwm_warmup"] if exact else result["warmup_peak_sampled"]
    result["call_peak"] = result["hwm_calls"] if exact else result["call_peak_sampled"]
    if exact:
        values = [v for v in (result["setup_peak"], result["warmup_peak"], result["call_peak"]) if v is not None]
        result["process_peak"] = max(values) if values else None
    else:
        result["process_peak"] = result.get("ru_maxrss")
    result["call_peak_anon"] = peak("calls", key="RssAnon")
    result["call_peak_file"] = peak("calls", key="RssFile")
    calls = peaks.get("calls")
    if calls:
        result["call_peak_split"] = (calls["RssAnon_at_peak"], calls["RssFile_at_peak"])
    if result.get("call_s"):
        result["median_s"] = statistics.median(result["call_s"])
        result["min_s"] = min(result["call_s"])
    return result


def compare_outputs(results: dict) -> list:
    import torch

    names = [m for m, r in results.items() if "_output" in r]
    rows = []
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            x, y = results[a]["_output"].double(), results[b]["_output"].double()
            scale = max(x.abs().max().item(), y.abs().max().item(), 1e-12)
            diff = (x - y).abs().max().item()
            rows.append({
                "a": a, "b": b, "max_abs_diff": diff, "max_abs_out": scale,
                "bit_identical": bool(torch.equal(results[a]["_output"], results[b]["_output"])),
                "allclose": bool(torch.allclose(x, y, rtol=1e-4, atol=1e-4 * scale)),
            })
    return rows


def _gib(value) -> str:
    return "   n/a" if value is None else f"{value / GIB:6.2f}"


def _snap(result: dict, at: str, key: str) -> str:
    """A value of the last diagnostic snapshot taken at `at` (GiB), or n/a."""
    found = [s.get(key) for s in result.get("snapshots", ()) if s.get("at") == at]
    return _gib(found[-1] if found else None)


def _ratio(value, best) -> str:
    return "  n/a" if value is None or not best else f"{value / best:5.2f}"


def main(argv=None) -> int:
    args = _parse_args(argv)
    if args.child is not None:
        return child_main(args)

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        print(f"unknown method(s) {unknown}; choose from {METHODS}")
        return 0
    if args.with_plain:
        methods.append("plain")

    print(f"bench_disk: size={args.size} granularity={args.granularity} calls={args.calls} (+1 warm-up) threads={args.threads} seed={args.seed} "
          f"methods={','.join(methods)}")
    print(f"python {platform.python_version()} on {platform.platform()}, {os.cpu_count()} CPUs; "
          f"temp folders under {args.tmp}")
    extra = malloc_env(args)
    inherited = sorted(k for k in os.environ if k.startswith("MALLOC_") and k not in extra)
    print("glibc malloc settings in the children (the same for every method): "
          + (", ".join(f"{k}={v}" for k, v in extra.items()) if extra else "glibc defaults (dynamic mmap threshold)")
          + (f"; also inherited from this shell: {', '.join(inherited)}" if inherited else ""))
    if args.profile:
        print("NOTE: --profile is on: cProfile slows the timed calls (Python-heavy paths most); "
              "read those times as a profile, not as a benchmark.")
    results = {}
    total_start = time.perf_counter()
    for method in methods:
        print(f"  running {method} in a fresh process ...", flush=True)
        result = summarise(run_child(method, args))
        results[method] = result
        if result.get("ok"):
            print(f"    build {result['build_s']:.1f} s, setup {result['setup_s']:.1f} s, warm-up "
                  f"{result['warmup_s']:.2f} s, calls {', '.join(f'{t:.2f}' for t in result['call_s'])} s; "
                  f"{result['disk_files']} file(s), {result['disk_bytes'] / GIB:.2f} GiB on disk; "
                  f"child wall {result['wall_s']:.0f} s", flush=True)
        else:
            print(f"    FAILED: {result.get('error')}")
            if result.get("traceback"):
                print("    " + result["traceback"].replace("\n", "\n    "))
    any_ok = next((r for r in results.values() if r.get("ok")), None)
    if any_ok:
        print(f"model: UNet2DConditionModel {args.size}, {any_ok['parameters'] / 1e6:.0f}M parameters, "
              f"{any_ok['weights_bytes'] / GIB:.2f} GiB of fp32 weights; RSS after imports "
              f"{any_ok['rss_after_imports'] / GIB:.2f} GiB, after building the model "
              f"{any_ok['rss_after_build'] / GIB:.2f} GiB")

    # --- table ----------------------------------------------------------------------------------------
    ok = {m: r for m, r in results.items() if r.get("ok")}

    def best_of_baselines(key):
        values = [ok[m][key] for m in BASELINES if m in ok and ok[m].get(key) is not None]
        return min(values) if values else None

    best = {key: best_of_baselines(key)
            for key in ("setup_peak", "rss_after_setup", "call_peak", "process_peak", "median_s")}
    header = (f"{'method':<27} {'setup':>6} {'after':>6} {'warmup':>6} {'call':>6} {'proc.':>6}"
              f" {'median':>8}"
              f" | {'ratio vs best of B,C':^29}")
    sub = (f"{'':<27} {'peak':>6} {'setup':>6} {'peak':>6} {'peak':>6} {'peak':>6} {'s/call':>8}"
           f" | {'setupPk':>7} {'callPk':>7} {'procPk':>6} {'time':>5}")
    print()
    exact_all = bool(ok) and all(r.get("hwm_exact") for r in ok.values())
    print("RSS in GiB. setup peak = getrusage ru_maxrss before the first call (build + setup); after setup = VmRSS "
          "after gc.collect();")
    if exact_all:
        print("warm-up / call peak = VmHWM of that phase (high-water mark reset via /proc/self/clear_refs at its "
              "start); proc. peak = max of the three.")
    else:
        print("warm-up / call peak = max VmRSS sampled every ~%g ms (clear_refs unavailable); proc. peak = ru_maxrss "
              "at the end." % args.sample_ms)
    print(header)
    print(sub)
    print("-" * len(sub))
    for method, r in results.items():
        if not r.get("ok"):
            print(f"{LABELS[method]:<27} FAILED: {r.get('error', '')[:120]}")
            continue
        print(f"{LABELS[method]:<27} {_gib(r['setup_peak'])} {_gib(r['rss_after_setup'])} {_gib(r['warmup_peak'])} "
              f"{_gib(r['call_peak'])} {_gib(r['process_peak'])} {r['median_s']:8.3f}"
              f" | {_ratio(r['setup_peak'], best['setup_peak']):>7} {_ratio(r['call_peak'], best['call_peak']):>7}"
              f" {_ratio(r['process_peak'], best['process_peak']):>6} {_ratio(r['median_s'], best['median_s']):>5}")
    print()
    print("Where the RSS is (GiB): anonymous vs file-backed (mmap) pages, from the ~%g ms sampler (it can miss "
          "spikes of a few ms);" % args.sample_ms)
    print("page faults per timed call (getrusage)")
    print(f"{'method':<27} {'after setup':>15} {'sampled':>7} {'at that peak':>15} {'calls max':>9}"
          f" {'calls max':>9} {'minflt':>8} {'majflt':>6} {'anon at calls':>15} {'glibc':>6}")
    print(f"{'':<27} {'anon / file':>15} {'callPk':>7} {'anon / file':>15} {'anon':>9} {'file':>9}"
          f" {'/call':>8} {'/call':>6} {'start /  end':>15} {'free':>6}")
    for method, r in ok.items():
        split = r.get("call_peak_split", (None, None))
        print(f"{LABELS[method]:<27} {_gib(r['rss_after_setup_anon'])} / {_gib(r['rss_after_setup_file'])}"
              f" {_gib(r['call_peak_sampled']):>7} {_gib(split[0])} / {_gib(split[1])}"
              f" {_gib(r['call_peak_anon']):>9} {_gib(r['call_peak_file']):>9}"
              f" {statistics.median(r['call_faults_minor']):8.0f} {statistics.median(r['call_faults_major']):6.0f}"
              f" {_snap(r, 'calls_start', 'RssAnon')} / {_snap(r, 'after_call', 'RssAnon')}"
              f" {_snap(r, 'after_call', 'malloc_fordblks')}")
    print("(anon at calls start / end: RssAnon before the first and after the last timed call; glibc free: bytes "
          "freed but kept by glibc's heaps after the last call, mallinfo2 fordblks. Anonymous memory that grows "
          "from call to call while 'glibc free' grows with it is heap retention by the allocator, not live data.)")

    if args.hook_timing:
        print()
        print("Time inside the offload hooks, per timed call (wall s; includes the weight reads and copies)")
        for method, r in ok.items():
            if not r.get("hook_timing"):
                continue
            print(f"  {LABELS[method]} (median call {r['median_s']:.3f} s):")
            for label, v in r["hook_timing"].items():
                print(f"    {label:<62} {v['total_s_per_call']:8.3f} s  ({v['count_per_call']} calls)")

    if args.profile:
        for method, r in ok.items():
            if r.get("profile_tottime"):
                print()
                print(f"cProfile of the timed calls, {LABELS[method]} -- top by tottime:")
                print(r["profile_tottime"])

    # --- outputs agree? ------------------------------------------------------------------------------
    comparisons = compare_outputs(results)
    print()
    print("Outputs (last call of each method; allclose: rtol=1e-4, atol=1e-4*max|out|)")
    for c in comparisons:
        verdict = "bit-identical" if c["bit_identical"] else ("allclose" if c["allclose"] else "DIFFER")
        print(f"  {c['a']:>10} vs {c['b']:<10}: max abs diff {c['max_abs_diff']:.3e} (max |out| "
              f"{c['max_abs_out']:.3e}) -> {verdict}")
    differing = set()
    for c in comparisons:
        if not c["allclose"]:
            differing.update((c["a"], c["b"]))
    if differing:
        print(f"  WARNING: outputs differ beyond the tolerance among: {', '.join(sorted(differing))}")
    for method, r in ok.items():
        if not r.get("calls_identical", True):
            print(f"  NOTE: {method}'s warm-up and last call outputs are not bit-identical")

    # --- targets ---------------------------------------------------------------------------------------
    print()
    targets = []
    if "offloadkit" in ok and any(m in ok for m in BASELINES):
        a = ok["offloadkit"]
        for key, what, tol in (("call_peak", "call peak RSS", args.rss_tol),
                               ("setup_peak", "setup peak RSS", args.rss_tol),
                               ("process_peak", "process peak RSS", args.rss_tol),
                               ("median_s", "median time per call", args.time_tol)):
            reference = best[key]
            ratio = a[key] / reference if reference else None
            passed = ratio is not None and ratio <= 1.0 + tol
            unit = "s" if key == "median_s" else "GiB"
            scale = 1.0 if key == "median_s" else GIB
            baselines = ", ".join(f"{m} {ok[m][key] / scale:.3f} {unit}" for m in BASELINES if m in ok)
            line = (f"{'PASS' if passed else 'FAIL'}: offloadkit {what} {a[key] / scale:.3f} {unit} <= best of "
                    f"({baselines})" + (f" x (1+{tol:g})" if tol else "") + f"  [ratio {ratio:.3f}]")
            print(line)
            targets.append({"target": what, "key": key, "offloadkit": a[key], "best_baseline": reference,
                            "ratio": ratio, "tolerance": tol, "pass": passed})
    else:
        print("targets: not evaluated (they need offloadkit and at least one of accelerate, diffusers, all succeeded)")
    print(f"total wall time {time.perf_counter() - total_start:.0f} s. Times on shared CPUs are noisy: compare ratios.")

    if args.json_path:
        clean = {m: {k: v for k, v in r.items() if not k.startswith("_")} for m, r in results.items()}
        payload = {"args": {k: v for k, v in vars(args).items() if k not in ("child", "result_dir")},
                   "python": platform.python_version(), "platform": platform.platform(),
                   "results": clean, "comparisons": comparisons, "targets": targets}
        with open(args.json_path, "w") as f:
            json.dump(payload, f, indent=2)
        print(f"wrote {args.json_path}")
    return 0


if __name__ == "__main__":
    try:
        code = main()
    except Exception:  # a measurement: report and exit 0
        traceback.print_exc()
        code = 0
    sys.exit(0 if code is None else 0)
