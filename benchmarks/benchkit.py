"""Shared pieces of the benchmark scripts: reading a process's memory, and running one method per child process.

Each method runs in its own fresh process because peak RSS (and peak VRAM) are
per-process high-water marks: methods sharing a process would mix them.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
import time


def read_status() -> dict:
    """VmRSS / RssAnon / RssFile / RssShmem / VmHWM of this process, in bytes (Linux /proc)."""
    wanted = {"VmRSS", "RssAnon", "RssFile", "RssShmem", "VmHWM"}
    found = {}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key in wanted:
                    found[key] = int(rest.split()[0]) * 1024
    except OSError:
        pass
    return found


def reset_hwm() -> bool:
    """Reset this process's RSS high-water mark (VmHWM) to its current RSS; False where the kernel refuses.

    Writing 5 to /proc/self/clear_refs (Linux >= 4.0). It also resets what getrusage's ru_maxrss reports.
    """
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def ru_maxrss_bytes() -> int:
    # Linux reports kilobytes (macOS bytes; these benchmarks read /proc, so Linux only).
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def run_child(method: str, command: list, folder: str, timeout: float, artefact: str | None = None,
              load_artefact=None, extra_env: dict | None = None) -> dict:
    """Run `command` (which writes `folder/result.json`), collect its result and delete `folder`.

    `extra_env` is added to the child's environment (e.g. glibc malloc tunables, which are read at start-up).
    """
    start = time.perf_counter()
    env = dict(os.environ, **extra_env) if extra_env else None
    try:
        proc = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)
        result_path = os.path.join(folder, "result.json")
        if os.path.isfile(result_path):
            with open(result_path, encoding="utf-8") as f:
                result = json.load(f)
        else:
            result = {"method": method, "ok": False,
                      "error": f"child exited with status {proc.returncode} and no result "
                               f"(killed for memory?): {proc.stderr[-2000:]}"}
        if artefact is not None:
            path = os.path.join(folder, artefact)
            if os.path.isfile(path):
                result[f"_{artefact.split('.')[0]}"] = load_artefact(path)
        result["returncode"] = proc.returncode
    except subprocess.TimeoutExpired:
        result = {"method": method, "ok": False, "error": f"child timed out after {timeout:.0f} s"}
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    result["wall_s"] = time.perf_counter() - start
    return result


def malloc_info() -> dict:
    """glibc's allocator totals (mallinfo2, glibc >= 2.33), in bytes; {} elsewhere.

    arena: bytes obtained from the OS with brk/arena heaps; hblkhd: bytes in mmapped chunks;
    fordblks: free bytes held inside arenas (not returned to the OS).
    """
    import ctypes

    class _MallInfo2(ctypes.Structure):
        _fields_ = [(name, ctypes.c_size_t) for name in
                    ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
                     "fordblks", "keepcost")]

    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallinfo2.restype = _MallInfo2
    except (OSError, AttributeError):
        return {}
    info = libc.mallinfo2()
    return {"arena": info.arena, "hblkhd": info.hblkhd, "hblks": info.hblks, "uordblks": info.uordblks,
            "fordblks": info.fordblks}
