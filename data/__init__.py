"""Data pipeline: `build_loader(config)`, the device-side batch preparation and the one-batch
look-ahead that overlaps the host->device copy with compute."""
from utils import DataError

from .build import build_loader, build_mixup
from .decode import DecodeError
from .device_prep import DevicePreprocessor
from .prefetch import DevicePrefetcher

__all__ = ['build_loader', 'build_mixup', 'DevicePreprocessor', 'DevicePrefetcher', 'DataError', 'DecodeError']
