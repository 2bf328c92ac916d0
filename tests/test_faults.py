"""Faults around a pipeline under a policy: threads, shared components, long-running servers, failing disks."""

import errno
import os
import threading
import time

import pytest
import torch

import offloadkit
from offloadkit.errors import OffloadkitError, PipelineError
from offloadkit.testing import tiny_call_kwargs, tiny_pipeline

from helpers import assert_same_images, model_components, run


def _weights(pipe):
    return {f"{n}.{k}": v.detach().clone() for n, m in model_components(pipe).items()
            for k, v in m.state_dict().items()}


def test_calls_from_two_threads_run_one_at_a_time_and_weights_stay_intact():
    pipe = tiny_pipeline("sdxl")
    reference, weights = run(pipe), _weights(pipe)
    handle = offloadkit.apply(pipe, "diffusers-default", device="cpu")
    inside, most, lock = [0], [0], threading.Lock()

    def step(_pipe, _step, _t, tensors):
        # Counts the calls inside a denoising step at once; the sleep gives another thread time to enter.
        with lock:
            inside[0] += 1
            most[0] = max(most[0], inside[0])
        time.sleep(0.02)
        with lock:
            inside[0] -= 1
        return tensors

    barrier, results, errors = threading.Barrier(2), [], []

    def worker():
        try:
            for _ in range(3):
                barrier.wait()
                results.append(pipe(**tiny_call_kwargs(pipe), callback_on_step_end=step).images)
        except Exception as exc:  # reported below: a thread's failure must fail the test
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == [] and len(results) == 6
    assert most[0] == 1, "two calls ran at once"
    for images in results:
        assert_same_images(images, reference)
    assert handle.trace.calls == 6
    handle.remove()
    after = _weights(pipe)
    assert all(torch.equal(after[k], v) for k, v in weights.items())


def test_a_call_from_inside_a_call_is_refused_and_the_pipeline_still_works():
    pipe = tiny_pipeline("sd")
    reference = run(pipe)
    offloadkit.apply(pipe, "diffusers-default", device="cpu")

    def reenter(_pipe, _step, _t, tensors):
        pipe(**tiny_call_kwargs(pipe))
        return tensors

    with pytest.raises(PipelineError, match="called from inside its own call"):
        pipe(**tiny_call_kwargs(pipe), callback_on_step_end=reenter)
    assert_same_images(run(pipe), reference)


@pytest.mark.parametrize("first", ["resident", "diffusers-default"])
def test_components_shared_with_a_pipeline_under_another_policy_are_refused_truthfully(first):
    from diffusers import StableDiffusionPipeline

    one = tiny_pipeline("sd")
    reference = run(one)
    first_policy = {"version": 1, "components": {"*": {"strategy": "resident"}}} if first == "resident" else first
    handle = offloadkit.apply(one, first_policy, device="cpu")
    two = StableDiffusionPipeline(**one.components)
    with pytest.raises(PipelineError) as caught:
        offloadkit.apply(two, "sequential", device="cpu")
    message = str(caught.value)
    assert "another pipeline (StableDiffusionPipeline" in message and "outside offloadkit" not in message
    assert "offloadkit.remove()" in message
    assert not hasattr(two, "_offloadkit_handle")
    handle.remove()  # the refused apply changed nothing: removing the first works
    assert_same_images(run(one), reference)
    # once the first policy is gone the second pipeline may take the components
    offloadkit.apply(two, "sequential", device="cpu")
    assert_same_images(run(two), reference)


def test_a_component_the_other_policy_skips_can_be_shared():
    from diffusers import StableDiffusionPipeline

    one = tiny_pipeline("sd")
    reference = run(one)
    offloadkit.apply(one, {"version": 1, "components": {"text_encoder": {"strategy": "model"},
                                                         "*": {"strategy": "skip"}}}, device="cpu")
    two = StableDiffusionPipeline(**one.components)
    offloadkit.apply(two, {"version": 1, "components": {"text_encoder": {"strategy": "skip"},
                                                         "*": {"strategy": "resident"}}}, device="cpu")
    assert_same_images(run(two), reference)


def test_the_trace_keeps_a_bounded_window_while_totals_stay_exact():
    pipe = tiny_pipeline("sd")
    handle = offloadkit.apply(pipe, "diffusers-default", device="cpu")
    run(pipe)
    per_call = len(handle.trace)
    per_call_bytes = handle.trace.bytes_moved()
    assert per_call > 0 and per_call_bytes > 0
    handle.trace.max_events = 2 * per_call
    handle.trace.max_calls = 2
    for _ in range(4):
        run(pipe)
    trace = handle.trace
    assert len(trace) == 2 * per_call and trace.total_events == 5 * per_call
    assert trace.dropped_events == 3 * per_call
    assert trace.bytes_moved() == 5 * per_call_bytes  # exact, though most events left the window
    assert [s.call for s in trace.calls_summary()] == [4, 5]
    assert all(s.bytes_moved == per_call_bytes for s in trace.calls_summary())
    assert {e.call for e in trace} == {4, 5}
    assert f"{5 * per_call} moves" in trace.summary() and "no longer kept" in trace.summary()
    import json

    data = json.loads(trace.to_json())
    assert data["total_events"] == 5 * per_call and len(data["events"]) == 2 * per_call
    for bad in (0, -1, 2.5, True, "10"):
        with pytest.raises(OffloadkitError, match="at least 1"):
            trace.max_events = bad


def test_the_default_window_holds_memory_flat_over_many_calls():
    from offloadkit.runtime.trace import MAX_CALLS, MAX_EVENTS, Trace

    trace = Trace()
    for call in range(MAX_CALLS + 50):
        trace.begin_call()
        for _ in range(MAX_EVENTS // MAX_CALLS + 1):
            trace.record("unet", "onload", "cpu", "cpu", 10, 0.0)
            trace.record("unet", "offload", "cpu", "cpu", 10, 0.0)
        trace.end_call()
    assert len(trace.events) == MAX_EVENTS and len(trace.summaries) == MAX_CALLS
    assert trace.bytes_moved() == (MAX_CALLS + 50) * (MAX_EVENTS // MAX_CALLS + 1) * 20


def _disk_policy(folder):
    return {"version": 1, "components": {"unet": {"strategy": "disk", "folder": str(folder)}}}


@pytest.mark.parametrize("folder", ["/proc/offloadkit-disk", "/dev/null/offloadkit"])
def test_an_unwritable_disk_folder_is_a_clear_error_and_nothing_changes(folder):
    pipe = tiny_pipeline("sd")
    reference = run(pipe)
    with pytest.raises(PipelineError) as caught:
        offloadkit.apply(pipe, _disk_policy(folder), device="cpu")
    message = str(caught.value)
    assert "'unet' (strategy disk) cannot keep its weights in" in message and folder in message
    assert "`folder:`" in message
    assert not hasattr(pipe, "_offloadkit_handle")
    assert all(p.device.type == "cpu" for p in pipe.unet.parameters())
    assert_same_images(run(pipe), reference)


def test_an_unwritable_temporary_folder_is_a_clear_error(monkeypatch):
    import tempfile

    pipe = tiny_pipeline("sd")
    monkeypatch.setattr(tempfile, "tempdir", "/proc/offloadkit-tmp")
    with pytest.raises(PipelineError, match="TMPDIR"):
        offloadkit.apply(pipe, {"version": 1, "components": {"unet": {"strategy": "disk"}}}, device="cpu")
    assert not hasattr(pipe, "_offloadkit_handle")


def test_a_full_disk_leaves_no_partial_file_behind(tmp_path, monkeypatch):
    import offloadkit.runtime.disk_store as disk_store

    real_write = disk_store.write_aligned

    def full_after_a_while(tensors, path):
        with open(path, "wb") as out:  # some bytes land, then the disk is full
            out.write(b"\0" * 4096)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(disk_store, "write_aligned", full_after_a_while)
    pipe = tiny_pipeline("sd")
    reference = run(pipe)
    with pytest.raises(PipelineError, match="needs .* and the disk has .* free"):
        offloadkit.apply(pipe, _disk_policy(tmp_path), device="cpu")
    assert os.listdir(tmp_path) == []
    monkeypatch.setattr(disk_store, "write_aligned", real_write)
    handle = offloadkit.apply(pipe, _disk_policy(tmp_path), device="cpu")
    assert_same_images(run(pipe), reference)
    handle.remove()
