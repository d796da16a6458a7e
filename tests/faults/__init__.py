"""Fault-injection tests and the fault stages they name from YAML."""
