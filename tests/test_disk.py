"""The `disk` strategy: idle weights in per-component safetensors files, meta tensors in the model."""

import os

import torch

import offloadkit
from offloadkit.runtime.disk_store import fingerprint
from offloadkit.testing import tiny_pipeline, tiny_sd3_pipeline

from helpers import assert_same_images, hooked_submodules, model_components, run


def test_weights_live_on_disk_between_calls_and_files_go_on_remove():
    pipe = tiny_pipeline("sd")
    reference = run(pipe)
    handle = offloadkit.apply(pipe, {"version": 1, "components": {"*": {"strategy": "disk"}}}, device="cpu")
    folder = handle._tmp
    assert sorted(p.split("-")[0] for p in os.listdir(folder)) == ["text_encoder", "unet", "vae"]
    for _ in range(2):
        assert_same_images(run(pipe), reference)
        for module in model_components(pipe).values():
            assert all(p.device.type == "meta" for p in module.parameters())
    handle.remove()
    assert not folder.exists()
    assert hooked_submodules(pipe) == []
    assert all(p.device.type == "cpu" for m in model_components(pipe).values() for p in m.parameters())
    assert_same_images(run(pipe), reference)


def test_same_class_components_in_one_folder_keep_their_own_weights(tmp_path):
    """SD3's two CLIP encoders have the same class and shapes; diffusers' disk group offload mixes such files up."""
    pipe = tiny_sd3_pipeline()
    assert type(pipe.text_encoder) is type(pipe.text_encoder_2)
    reference = run(pipe)
    policy = {"version": 1, "components": {
        "text_encoder": {"strategy": "disk", "folder": str(tmp_path)},
        "text_encoder_2": {"strategy": "disk", "folder": str(tmp_path)}}}
    handle = offloadkit.apply(pipe, policy, device="cpu")
    names = sorted(os.listdir(tmp_path))
    assert len(names) == 2 and names[0].startswith("text_encoder-") and names[1].startswith("text_encoder_2-")
    assert_same_images(run(pipe), reference)
    handle.remove()
    assert os.listdir(tmp_path) == []


def test_files_of_other_weights_are_never_read(tmp_path):
    pipe = tiny_pipeline("sd")
    reference = run(pipe)
    # a file left by a run with other weights (another seed) under the same component name
    other = tiny_pipeline("sd", seed=1)
    stale = offloadkit.apply(other, {"version": 1, "components": {"unet": {"strategy": "disk", "folder": str(tmp_path)}}},
                             device="cpu")
    stale_folder = next(iter(os.listdir(tmp_path)))
    handle = offloadkit.apply(pipe, {"version": 1, "components": {"unet": {"strategy": "disk", "folder": str(tmp_path)}}},
                              device="cpu")
    assert len(os.listdir(tmp_path)) == 2 and stale_folder in os.listdir(tmp_path)
    assert_same_images(run(pipe), reference)
    handle.remove()
    stale.remove()


def test_fingerprint_changes_with_any_byte():
    weights = {"a": torch.zeros(4), "b": torch.ones(2, 2)}
    changed = {"a": torch.zeros(4), "b": torch.ones(2, 2)}
    changed["b"][1, 1] = 1.0000001
    assert fingerprint(weights) == fingerprint({k: v.clone() for k, v in weights.items()})
    assert fingerprint(weights) != fingerprint(changed)
    assert fingerprint(weights) != fingerprint({"a": torch.zeros(4), "c": torch.ones(2, 2)})


def test_tied_weights_are_stored_once_and_tied_again():
    pipe = tiny_sd3_pipeline(with_t5=True)
    t5 = pipe.text_encoder_3
    reference = run(pipe)
    handle = offloadkit.apply(pipe, {"version": 1, "components": {"text_encoder_3": {"strategy": "disk"}}},
                              device="cpu")
    assert handle._weights["text_encoder_3"].aliases == {"encoder.embed_tokens.weight": "shared.weight"}
    assert_same_images(run(pipe), reference)
    handle.remove()
    assert t5.shared.weight is t5.encoder.embed_tokens.weight
    assert_same_images(run(pipe), reference)


def test_files_are_standard_safetensors_with_page_aligned_tensors(tmp_path):
    import json
    import mmap
    import struct

    from safetensors.torch import load_file

    from offloadkit.runtime.disk_store import PAD_PREFIX, store

    torch.manual_seed(0)
    tensors = {"a.weight": torch.randn(3, 5), "b.bias": torch.randn(7), "c.half": torch.randn(4).half(),
               "d.index": torch.arange(5), "e.empty": torch.empty(0)}
    weights = store("unit", tensors, tmp_path)
    loaded = {k: v for k, v in load_file(str(weights.path)).items() if not k.startswith(PAD_PREFIX)}
    assert set(loaded) == set(tensors)
    for key, tensor in tensors.items():
        assert torch.equal(loaded[key], tensor) and torch.equal(weights[key], tensor)
    raw = weights.path.read_bytes()
    header_size = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + header_size])
    assert (8 + header_size) % mmap.PAGESIZE == 0
    assert all(entry["data_offsets"][0] % mmap.PAGESIZE == 0
               for key, entry in header.items() if not key.startswith(PAD_PREFIX))
    weights.release(list(tensors))  # pages handed back; the values are read from the file again
    assert torch.equal(weights["a.weight"], tensors["a.weight"])


def test_block_granularity_streams_whole_blocks_with_fewer_hooks():
    from offloadkit.runtime.streaming import offloading_modules

    reference_pipe = tiny_pipeline("sdxl")
    reference = run(reference_pipe)
    counts = {}
    for granularity in ("layer", "block"):
        pipe = tiny_pipeline("sdxl")
        rule = {"strategy": "disk", "granularity": granularity}
        handle = offloadkit.apply(pipe, {"version": 1, "components": {"*": rule}}, device="cpu")
        counts[granularity] = len(list(offloading_modules(pipe.unet)))
        for _ in range(2):
            assert_same_images(run(pipe), reference)
            assert all(p.device.type == "meta" for p in pipe.unet.parameters())
        handle.remove()
        assert hooked_submodules(pipe) == []
        assert_same_images(run(pipe), reference)
    assert counts["block"] * 3 < counts["layer"]


def test_block_granularity_refuses_offloaded_buffers():
    from offloadkit.errors import PolicyError

    import pytest

    with pytest.raises(PolicyError, match="`offload_buffers: true` does not work with `granularity: block`"):
        offloadkit.load({"version": 1, "components": {"unet": {"strategy": "disk", "granularity": "block",
                                                               "offload_buffers": True}}})


def test_plan_tells_glibc_users_how_to_keep_host_ram_down(monkeypatch):
    import platform

    pipe = tiny_pipeline("sd")
    disk = {"version": 1, "components": {"unet": {"strategy": "disk"}}}
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    monkeypatch.setattr(platform, "libc_ver", lambda *args, **kwargs: ("glibc", "2.39"))
    notes = offloadkit.predict(pipe, disk, device="cpu").notes
    assert any("MALLOC_MMAP_THRESHOLD_=1048576" in n for n in notes), notes
    # only for the disk tier, only under glibc, and not once the variable is set
    assert not any("MALLOC" in n for n in offloadkit.predict(pipe, "diffusers-default", device="cpu").notes)
    monkeypatch.setattr(platform, "libc_ver", lambda *args, **kwargs: ("", ""))
    assert not any("MALLOC" in n for n in offloadkit.predict(pipe, disk, device="cpu").notes)
    monkeypatch.setattr(platform, "libc_ver", lambda *args, **kwargs: ("glibc", "2.39"))
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "1048576")
    assert not any("MALLOC" in n for n in offloadkit.predict(pipe, disk, device="cpu").notes)
