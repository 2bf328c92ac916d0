"""Some modules' tensors laid out in one flat byte buffer, and put back on the modules as views of any copy of it.

One buffer per block means one copy per block, host to device, whatever the weights
are: a copy engine moves one large transfer far faster than hundreds of small ones, and
the device side can be a slot of a fixed pool instead of fresh allocations.

Every tensor is reduced to the plain tensors that really hold its bytes (its leaves):

- a plain parameter or buffer, and parameter subclasses with ordinary storage
  (bitsandbytes' `Int8Params`/`Params4bit`, GGUF's `GGUFParameter`): its data, set back
  with `tensor.data = view`, which keeps the object and its attributes (`quant_type`);
- wrapper subclasses (torchao, optimum-quanto): the inner tensors `__tensor_flatten__`
  names, recursively; set back by rebuilding the subclass around the views
  (`__tensor_unflatten__`) and `torch.utils.swap_tensors`, since assigning `.data` leaves a
  wrapper's inner tensors where they were;
- tensors bitsandbytes keeps beside the weight: `SCB`/`CB` on the parameter, the 4-bit
  `quant_state` (absmax, code, offset, nested state) and a Linear8bitLt's `state.CB`/`SCB`;
  set back with `setattr`.

A leaf reached twice (a tied weight, `state.CB` that is the weight's data) is stored once.
"""

from __future__ import annotations

_ALIGN = 256  # each leaf starts on this boundary: any dtype's view is aligned, and so are vector loads
_SIDE_ATTRS = ("SCB", "CB")  # bitsandbytes: tensors kept as attributes of the weight or of the layer's state
# Wrapper tensors whose packing depends on the device (quanto's int4 TinyGemm and Marlin layouts, AWQ).
_DEVICE_PACKED = ("TinyGemm", "Marlin", "AWQ")


def _round(value: int) -> int:
    return -(-value // _ALIGN) * _ALIGN


class _Leaf:
    __slots__ = ("offset", "nbytes", "dtype", "shape", "stride")

    def __init__(self, offset, tensor):
        self.offset = offset
        self.nbytes = tensor.numel() * tensor.element_size()
        self.dtype = tensor.dtype
        self.shape = tuple(tensor.shape)
        dense = tensor.is_contiguous() or _dense(tensor)
        self.stride = tuple(tensor.stride()) if dense else None

    def view(self, buffer):
        flat = buffer[self.offset:self.offset + self.nbytes].view(self.dtype)
        return flat.as_strided(self.shape, self.stride or _contiguous_strides(self.shape))


def _contiguous_strides(shape):
    strides, step = [], 1
    for size in reversed(shape):
        strides.append(step)
        step *= max(size, 1)
    return tuple(reversed(strides))


def _dense(tensor) -> bool:
    """Non-overlapping and dense (a permutation of a contiguous layout): its bytes can be kept as they are."""
    pairs = sorted((s, n) for s, n in zip(tensor.stride(), tensor.shape) if n > 1)
    step = 1
    for stride, size in pairs:
        if stride != step:
            return False
        step *= size
    return True


def _identity(tensor):
    return (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape), tuple(tensor.stride()),
            tensor.dtype)


class _LeafRef:
    """In a snapshot of an object's attributes: the tensor that is leaf `index`."""

    __slots__ = ("index",)

    def __init__(self, index: int):
        self.index = index


class _Tree:
    """A wrapper subclass: its class, flatten context and inner tensors (leaf indices or nested trees)."""

    __slots__ = ("cls", "ctx", "size", "stride", "inner", "extra")

    def __init__(self, cls, ctx, size, stride, inner, extra):
        self.cls, self.ctx, self.size, self.stride, self.inner, self.extra = cls, ctx, size, stride, inner, extra

    def build(self, leaves):
        inner = {name: (part.build(leaves) if isinstance(part, _Tree) else leaves[part])
                 for name, part in self.inner.items()}
        rebuilt = self.cls.__tensor_unflatten__(inner, self.ctx, self.size, self.stride)
        for key, value in self.extra.items():  # e.g. `_is_param`, which swap_tensors would take away
            rebuilt.__dict__.setdefault(key, value)
        return rebuilt


class PackedWeights:
    """The tensors of `tensors` (and the bitsandbytes state of `modules`) packed into one host byte buffer.

    `host` is that buffer (pinned when asked); `attach(buffer)` makes the modules' tensors views of
    any buffer with the same layout (a device slot, or `host`); `detach()` points them at `host` again.
    """

    def __init__(self, tensors, modules=(), pinned: bool = False, host=None):
        import torch

        self._leaves: list[_Leaf] = []
        self._by_identity: dict = {}
        self._holders: list = []  # (kind, object, attribute or None, leaf index, tree or plain value)
        self._sources: list = []  # the live tensor of each leaf, read once to fill the host buffer
        self.size = 0
        seen = set()
        for tensor in tensors:
            if id(tensor) in seen:
                continue
            seen.add(id(tensor))
            self._add_tensor(tensor)
        for module in modules:
            state = vars(module).get("state")
            if type(state).__name__ == "MatmulLtState":
                # The layer's state takes the weight's `CB`/`SCB` at its first forward: held from the start,
                # so that no reference to a device copy outlives the copy.
                weight = module._parameters.get("weight")
                for name in _SIDE_ATTRS:
                    value = getattr(state, name, None)
                    if not _is_tensor(value):
                        value = getattr(weight, name, None)
                    if _is_tensor(value):
                        self._holders.append(("attr", state, name, self._leaf(value)))
        self.nbytes = self.size
        self.size = _round(self.size)
        if host is None:
            host = torch.empty(self.size, dtype=torch.uint8, pin_memory=pinned)
            for leaf, source in zip(self._leaves, self._sources):
                leaf.view(host).copy_(source.detach())
        self.host = host
        self.pinned = pinned
        self._sources = []
        self.attach(host)  # the host buffer is now the modules' storage: no second copy in RAM

    # --- collecting leaves --------------------------------------------------------------------------

    def _leaf(self, tensor) -> int:
        key = _identity(tensor)
        index = self._by_identity.get(key)
        if index is None:
            index = len(self._leaves)
            self._leaves.append(_Leaf(self.size, tensor))
            self._sources.append(tensor)
            self._by_identity[key] = index
            self.size = _round(self.size + self._leaves[-1].nbytes)
        return index

    def _tree(self, tensor):
        names, ctx = tensor.__tensor_flatten__()
        inner = {}
        for name in names:
            part = getattr(tensor, name)
            inner[name] = self._tree(part) if _is_wrapper(part) else self._leaf(part)
        extra = {k: v for k, v in vars(tensor).items() if k not in names and not _is_tensor(v)}
        return _Tree(type(tensor), ctx, tensor.size(), tensor.stride(), inner, extra)

    def _add_tensor(self, tensor) -> None:
        kind = type(tensor).__name__
        if any(mark in kind for mark in _DEVICE_PACKED):
            from ..errors import PipelineError

            raise PipelineError(f"a {kind} weight is packed for the device it was made on (its bytes mean "
                                "something else on another device), so its bytes cannot be copied to the "
                                "device as they are. Use `strategy: model` with `transfer: standard` for this "
                                "model, or quantize it with a device-independent format (e.g. quanto qint8)")
        if kind == "Int8Params" and _is_tensor(getattr(tensor, "CB", None)) \
                and tensor.CB.device != tensor.data.device:
            # moved by a parent module's `.to()`, which keeps only `.data`: `CB` is the same int8 data, left behind
            tensor.CB = tensor.data
        if _is_wrapper(tensor):
            self._holders.append(("swap", tensor, None, self._tree(tensor)))
            return
        self._holders.append(("data", tensor, None, self._leaf(tensor.data)))
        self._add_attrs(tensor, _SIDE_ATTRS)
        state = vars(tensor).get("quant_state")
        while state is not None:  # bitsandbytes 4-bit, with its nested state
            # The whole state is put back each time, not only its tensors: on a CPU with AVX512-BF16 the
            # layer repacks its weight and rewrites its state at its first forward (absmax, dtype, nesting, a
            # flag), and the packed copy holds the layout from before that.
            snapshot = {key: (_LeafRef(self._leaf(value)) if _is_tensor(value) else value)
                        for key, value in vars(state).items()}
            self._holders.append(("state", state, None, snapshot))
            state = getattr(state, "state2", None)

    def _add_attrs(self, owner, names) -> None:
        for name in names:
            value = getattr(owner, name, None)
            if _is_tensor(value):
                self._holders.append(("attr", owner, name, self._leaf(value)))

    # --- putting views back -------------------------------------------------------------------------

    def attach(self, buffer) -> None:
        """The modules' tensors become views of `buffer` (same layout as `host`, on any device)."""
        self._set([leaf.view(buffer) for leaf in self._leaves])

    def detach(self) -> None:
        """The modules' tensors become views of the host buffer again: the device copy is dropped, not copied back."""
        self.attach(self.host)

    def unpack(self) -> None:
        """Give the modules ordinary tensors of their own again (copies of the host buffer), for `remove()`."""
        self._set([leaf.view(self.host).clone() for leaf in self._leaves])

    def _set(self, leaves) -> None:
        import torch

        for kind, obj, attr, where in self._holders:
            if kind == "data":
                # The object stays the one the module holds (compiled graphs keep weak references to it),
                # with its attributes (`quant_type`, `quant_state`, `SCB`).
                obj.data = leaves[where]
            elif kind == "attr":
                setattr(obj, attr, leaves[where])
            elif kind == "state":
                vars(obj).clear()
                vars(obj).update({key: (leaves[value.index] if isinstance(value, _LeafRef) else value)
                                  for key, value in where.items()})
            else:
                try:
                    torch.utils.swap_tensors(obj, where.build(leaves))
                except RuntimeError as exc:
                    if "weakref" not in str(exc):
                        raise
                    from ..errors import PipelineError

                    raise PipelineError(
                        f"a {type(obj).__name__} weight cannot be moved while torch.compile holds a reference to "
                        "it: wrapper tensors (torchao, quanto) move by swapping, which such a reference forbids. "
                        "Leave this model uncompiled under `stream` or a copy-free `model` transfer, or use "
                        "`transfer: standard`") from None

    def points_into(self, buffer, tensor) -> bool:
        """Whether `tensor`'s data lies in `buffer` (for checks of where a module's weights are)."""
        start = buffer.data_ptr()
        return start <= tensor.data_ptr() < start + buffer.numel()

    def copy_to(self, buffer, non_blocking: bool = False):
        """Copy the host buffer into `buffer` (one transfer); returns the part of `buffer` written."""
        return buffer[:self.size].copy_(self.host, non_blocking=non_blocking)


def _is_tensor(value) -> bool:
    import torch

    return isinstance(value, torch.Tensor)


def _is_wrapper(tensor) -> bool:
    """A wrapper subclass (torchao, quanto): its bytes are in the inner tensors `__tensor_flatten__` names."""
    return hasattr(tensor, "__tensor_flatten__")


def needs_packing(module) -> bool:
    """Whether some weight of `module` cannot be moved by assigning `.data` (wrapper tensors, bitsandbytes)."""
    for sub in module.modules():
        if type(vars(sub).get("state")).__name__ == "MatmulLtState":
            return True
        for tensor in (*sub._parameters.values(), *sub._buffers.values()):
            if tensor is None:
                continue
            if _is_wrapper(tensor) or any(_is_tensor(getattr(tensor, name, None)) for name in _SIDE_ATTRS) \
                    or vars(tensor).get("quant_state") is not None:
                return True
    return False
