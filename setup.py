"""Builds the one compiled helper: memory barriers for shared rings."""
from setuptools import setup

setup(cffi_modules=["xenback/_barrier_build.py:ffibuilder"])
