"""The policy JSON Schema, shipped inside the package as `offloadkit.policy.schemas` (see pyproject.toml).

The file stays at the top of the repository, where editors and the `$schema=../schemas/policy.schema.json`
lines of the built-in and example policies find it; `offloadkit schema --check` keeps it current.
"""
