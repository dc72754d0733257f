"""Shared test setup. Guest routing (lab or here) comes from vmmkit's pytest plugin."""
