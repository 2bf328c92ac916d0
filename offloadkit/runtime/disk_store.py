"""Weights kept in safetensors files on disk, read through a memory map when a layer needs them.

Files are namespaced per component and per weights fingerprint: two components of
the same class never read each other's file, and a file is reused only when its
fingerprint (a hash of every tensor's name, dtype, shape and bytes) matches, so a
stale file from other weights is never read.

Layout: a standard safetensors file whose tensors all start on a page boundary
(the gaps are filled with `__pad_N__` byte entries, since the format allows no
holes). That lets a layer use the mapped pages as they are, with no copy, and
lets `release()` hand a layer's pages back to the kernel right after its forward,
so the file never accumulates in the process's resident memory.
"""

from __future__ import annotations

import errno
import hashlib
import json
import mmap
import shutil
import struct
from collections.abc import Mapping
from pathlib import Path

from .. import progress
from ..errors import PipelineError
from ..units import DTYPES, format_bytes, torch_dtype_name

FILE_NAME = "weights.safetensors"
PAGE = mmap.PAGESIZE
PAD_PREFIX = "__pad_"
PROGRESS_FROM = 256 * 2**20  # files smaller than this are written without a progress bar

_DTYPE_NAMES = {name: code for name, (_, code) in DTYPES.items()}  # torch dtype name -> safetensors dtype
_ITEMSIZE = {code: size for size, code in DTYPES.values()}


def _as_bytes(tensor):
    """A flat uint8 view of a tensor's data, without copying (contiguous tensors only)."""
    import torch

    return tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy()


def fingerprint(tensors: dict) -> str:
    """A short content hash of a state dict (names, dtypes, shapes and bytes)."""
    digest = hashlib.blake2b(digest_size=12)
    for key in sorted(tensors):
        tensor = tensors[key]
        digest.update(f"{key}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        if tensor.numel():
            digest.update(_as_bytes(tensor))
    return digest.hexdigest()


def split_aliases(tensors: dict) -> tuple[dict, dict]:
    """Unique tensors to store, and alias -> stored key for names that share one tensor (tied weights)."""
    primary, aliases, seen = {}, {}, {}
    for key, tensor in tensors.items():
        identity = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape),
                    tensor.dtype) if tensor.numel() else None
        if identity is not None and identity in seen:
            aliases[key] = seen[identity]
        else:
            if identity is not None:
                seen[identity] = key
            primary[key] = tensor
    return primary, aliases


def _round_up(value: int) -> int:
    return -(-value // PAGE) * PAGE


def write_aligned(tensors: dict, path: Path) -> None:
    """Write a safetensors file whose tensors all start on a page boundary."""
    entries, offset, pads = {}, 0, 0
    for key in sorted(tensors):
        tensor = tensors[key]
        dtype = _DTYPE_NAMES.get(torch_dtype_name(tensor.dtype))
        if dtype is None:
            raise ValueError(f"cannot store {key!r}: dtype {tensor.dtype} has no safetensors name")
        aligned = _round_up(offset)
        if aligned != offset:
            entries[f"{PAD_PREFIX}{pads}__"] = {"dtype": "U8", "shape": [aligned - offset],
                                                "data_offsets": [offset, aligned]}
            pads += 1
        size = tensor.numel() * tensor.element_size()
        entries[key] = {"dtype": dtype, "shape": list(tensor.shape), "data_offsets": [aligned, aligned + size]}
        offset = aligned + size
    header = json.dumps(entries, separators=(",", ":")).encode()
    # the data section starts on a page boundary too: pad the header with spaces (allowed by the format)
    header += b" " * (_round_up(8 + len(header)) - 8 - len(header))
    with open(path, "wb") as out, progress.bar(f"writing {path.parent.name}", total=offset, unit="B",
                                               min_total=PROGRESS_FROM) as shown:
        out.write(struct.pack("<Q", len(header)))
        out.write(header)
        written = 0
        for key, entry in entries.items():
            begin, end = entry["data_offsets"]
            if key.startswith(PAD_PREFIX):
                out.write(b"\0" * (end - begin))
            elif end > begin:
                out.write(memoryview(_as_bytes(tensors[key])))
            shown.update(end - written)
            written = end
        assert written == offset


class DiskWeights(Mapping):
    """Read-only mapping over one component's file: tensors are views of the memory map (no copy)."""

    def __init__(self, path: Path, keys: list[str], aliases: dict):
        import torch

        self.path = Path(path)
        self._aliases = dict(aliases)
        self._keys = list(keys)
        self._known = set(keys)
        with open(self.path, "rb") as source:
            header_size = struct.unpack("<Q", source.read(8))[0]
            header = json.loads(source.read(header_size))
            # a private (copy-on-write) mapping: writable for torch.frombuffer, never written back
            self._map = mmap.mmap(source.fileno(), 0, access=mmap.ACCESS_COPY)
        start = 8 + header_size
        self._entries = {}
        for key, entry in header.items():
            if key.startswith(PAD_PREFIX) or key == "__metadata__":
                continue
            begin, end = entry["data_offsets"]
            self._entries[key] = (start + begin, start + end, entry["dtype"], entry["shape"])
        self._dtypes = {name: getattr(torch, torch_name) for torch_name, name in _DTYPE_NAMES.items()}

    def __getitem__(self, key):
        import torch

        if key not in self._known:  # e.g. a non-persistent buffer: Mapping.get() expects KeyError
            raise KeyError(key)
        begin, end, dtype, shape = self._entries[self._aliases.get(key, key)]
        if end == begin:
            return torch.empty(shape, dtype=self._dtypes[dtype])
        flat = torch.frombuffer(self._map, dtype=self._dtypes[dtype], count=(end - begin) // _ITEMSIZE[dtype],
                                offset=begin)
        return flat.view(shape)

    def release(self, keys) -> None:
        """Give the pages of these tensors back to the kernel (they are read from the file again if needed)."""
        if not hasattr(mmap, "MADV_DONTNEED"):  # not on this platform: the kernel reclaims pages itself
            return
        for key in keys:
            entry = self._entries.get(self._aliases.get(key, key))
            if entry is None or entry[1] == entry[0]:
                continue
            begin, end = entry[0], _round_up(entry[1])
            self._map.madvise(mmap.MADV_DONTNEED, begin, min(end, len(self._map)) - begin)

    def close(self) -> None:
        try:
            self._map.close()
        except BufferError:  # a tensor still views the map; the mapping goes when it does
            pass

    def __iter__(self):
        return iter(self._keys)

    def __len__(self):
        return len(self._keys)

    @property
    def aliases(self) -> dict:
        return dict(self._aliases)


def store(component: str, tensors: dict, folder: Path) -> DiskWeights:
    """Write (or reuse, when the fingerprint matches) the component's file under `folder`."""
    primary, aliases = split_aliases(tensors)
    target = Path(folder) / f"{component}-{fingerprint(primary)}"
    path = target / FILE_NAME
    if not path.is_file():
        created = not target.exists()
        partial = target / (FILE_NAME + ".partial")
        try:
            target.mkdir(parents=True, exist_ok=True)
            write_aligned(primary, partial)
            partial.replace(path)  # readers never see a half-written file
        except OSError as exc:
            # nothing half-written is left behind: the partial file, and the folder if this made it
            if partial.is_file():
                partial.unlink()
            if created:
                shutil.rmtree(target, ignore_errors=True)
            raise unwritable(component, Path(folder), exc, _stored_bytes(primary)) from None
    return DiskWeights(path, list(tensors), aliases)


def _stored_bytes(tensors: dict) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


def unwritable(component: str, folder: Path, exc: OSError, needed: int | None = None) -> PipelineError:
    """The error for a disk-tier folder that cannot take a component's file: what failed and what to do."""
    reason = exc.strerror or str(exc)
    if exc.errno in (errno.ENOSPC, errno.EDQUOT) and needed is not None:
        try:
            free = f"{format_bytes(shutil.disk_usage(folder).free)} free"
        except OSError:
            free = "less free"
        hint = (f"its file needs {format_bytes(needed)} and the disk has {free}. Free space there, or set the "
                "rule's `folder:` to a disk with room")
    else:
        hint = ("set the rule's `folder:` to a folder this process can write (it is created if missing; without "
                "`folder:` the files go to a temporary folder under TMPDIR)")
    return PipelineError(f"{component!r} (strategy disk) cannot keep its weights in {str(folder)!r}: {reason}. "
                         f"Nothing was changed; {hint}")


def discard(weights: DiskWeights) -> None:
    """Delete the component's folder (its name carries the fingerprint, so nothing else lives there)."""
    weights.close()
    shutil.rmtree(weights.path.parent, ignore_errors=True)
