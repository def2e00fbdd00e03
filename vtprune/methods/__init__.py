"""Pruning methods: one module per method, each registering its config class."""

from vtprune.methods.fastv import FastV
from vtprune.methods.random import Random
from vtprune.methods.uniform import Uniform

__all__ = ["FastV", "Random", "Uniform"]
