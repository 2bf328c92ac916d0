"""Built-in offloadkit policies, shipped as YAML files inside the package `offloadkit.policies`."""
