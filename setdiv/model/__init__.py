"""Encoders, set prediction modules and the full set-based retrieval model."""

from setdiv.model.encoders import IMAGE_ENCODERS, TEXT_ENCODERS
from setdiv.model.layers import Features
from setdiv.model.model import SetRetrievalModel, build_model
from setdiv.model.set_modules import SET_MODULES, SetOutput

__all__ = [
    "IMAGE_ENCODERS",
    "SET_MODULES",
    "TEXT_ENCODERS",
    "Features",
    "SetOutput",
    "SetRetrievalModel",
    "build_model",
]
