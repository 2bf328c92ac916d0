"""Built-in hardware profiles (nominal spec-sheet values), shipped as YAML files in `offloadkit.hardware_profiles`."""
