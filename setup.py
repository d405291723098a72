"""Only here for cffi_modules: the native layer ckpt._native is built by native/build.py."""

from setuptools import setup

setup(cffi_modules=["native/build.py:ffibuilder"])
