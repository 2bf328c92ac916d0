"""YAML text -> Policy. Imports no torch, diffusers, accelerate or transformers (checked by import-linter).

`yaml_source` parses with positions, `documents` reads files and built-ins and locates every
problem, `rules` holds the rule class of each strategy, `schema` the policy model, `loading`
follows `extends` and checks what a schema cannot, `capabilities` is the quantization
capability table as data; built-in policy files ship in `builtin` (the repository's `policies/`).
"""
