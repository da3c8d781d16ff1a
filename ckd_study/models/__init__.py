"""The CIFAR model zoo (RepDistiller / mdistiller definitions); see ``base`` for the shared interface."""

from .base import ModelOutput, UnknownModelError, ZooModel, available_models, create_model, register_model

# Importing the family modules registers their models.
from . import resnet, resnetv2, wrn, vgg, mobilenetv2, shufflenetv1, shufflenetv2  # noqa: F401,E402

__all__ = ["ModelOutput", "UnknownModelError", "ZooModel", "available_models", "create_model", "register_model"]
