"""vmmkit: a KVM virtual machine monitor in Python, built as a small core plus plugins."""

__version__ = "0.1.0"
