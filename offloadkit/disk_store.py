"""Weights kept in safetensors files on disk, read through a memory map when a layer needs them.

Files are namespaced per component and per weights fingerprint: two components of
the same class never read each other's file, and a file is reused only when its
fingerprint (a hash of every tensor's name, dtype, shape and bytes) matches, so a
stale file from other weights is never read.
"""

from __future__ import annotations

import hashlib
import shutil
from collections.abc import Mapping
from pathlib import Path

FILE_NAME = "weights.safetensors"


def fingerprint(tensors: dict) -> str:
    """A short content hash of a state dict (names, dtypes, shapes and bytes)."""
    digest = hashlib.blake2b(digest_size=12)
    for key in sorted(tensors):
        tensor = tensors[key].detach().contiguous()
        digest.update(f"{key}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.view(-1).view(dtype=_byte_dtype()).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def _byte_dtype():
    import torch

    return torch.uint8


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


class DiskWeights(Mapping):
    """Read-only mapping over one component's safetensors file (tied names resolve to one stored tensor)."""

    def __init__(self, path: Path, keys: list[str], aliases: dict):
        from safetensors import safe_open

        self.path = path
        self._file = safe_open(str(path), framework="pt", device="cpu")
        self._keys = list(keys)
        self._known = set(keys)
        self._aliases = dict(aliases)

    def __getitem__(self, key):
        if key not in self._known:  # e.g. a non-persistent buffer: Mapping.get() expects KeyError
            raise KeyError(key)
        tensor = self._file.get_tensor(self._aliases.get(key, key))
        # Tensors read from the file need not be 64-byte aligned, and CPU matmul kernels then take another
        # path whose results differ in the last bit; an aligned copy computes exactly like the original.
        return tensor.clone() if tensor.data_ptr() % 64 else tensor

    def __iter__(self):
        return iter(self._keys)

    def __len__(self):
        return len(self._keys)

    @property
    def aliases(self) -> dict:
        return dict(self._aliases)


def store(component: str, tensors: dict, folder: Path) -> DiskWeights:
    """Write (or reuse, when the fingerprint matches) the component's file under `folder`."""
    from safetensors.torch import save_file

    primary, aliases = split_aliases(tensors)
    target = Path(folder) / f"{component}-{fingerprint(primary)}"
    path = target / FILE_NAME
    if not path.is_file():
        target.mkdir(parents=True, exist_ok=True)
        partial = target / (FILE_NAME + ".partial")
        save_file({k: v.detach().contiguous() for k, v in primary.items()}, str(partial))
        partial.replace(path)  # readers never see a half-written file
    return DiskWeights(path, list(tensors), aliases)


def discard(weights: DiskWeights) -> None:
    """Delete the component's folder (its name carries the fingerprint, so nothing else lives there)."""
    shutil.rmtree(weights.path.parent, ignore_errors=True)
