"""setuptools shim: cffi builds vmmkit._native from native/ when the package installs."""

from setuptools import setup

setup(cffi_modules=["native/build_native.py:ffibuilder"])
