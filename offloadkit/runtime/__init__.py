"""Plan -> hooks on a live pipeline -> Trace.

`install` is `apply`/`plan`/`remove`; `handle` the `OffloadHandle`, the one owner of hook state;
`strategies/` one installer per strategy, registered by rule class; `pipeline_class` the subclass
that owns end of call and execution device; `transfers`, `streaming` and `disk_store` move weights;
`precision` applies declared precision; `trace` records what moved; `compile_safety` keeps hook
bookkeeping out of `torch.compile`.
"""
