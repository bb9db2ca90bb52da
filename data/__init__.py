"""Data pipeline: `build_loader(config)` and the device-side batch preparation."""
from .build import build_loader, build_mixup
from .decode import DecodeError
from .device_prep import DevicePreprocessor
from .sources import DataError

__all__ = ['build_loader', 'build_mixup', 'DevicePreprocessor', 'DataError', 'DecodeError']
