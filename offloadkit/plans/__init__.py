"""Policy + pipeline (a loaded one, a pipeline class, or an architecture's configs) -> Plan. Mutates nothing.

`pipeline_spec` describes the pipeline, `stages` names where each component's work belongs,
`quantization` detects backends, `precision` plans declared precision changes, `library_gates`
asks the installed libraries about the capability table's gated limits, `component_rules` picks
each model's rule, `resolve` builds the `Plan` (`plan`).
"""
