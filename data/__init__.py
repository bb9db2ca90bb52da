"""Data pipeline: `build_loader(config)`, the device-side batch preparation and the one-batch
look-ahead that overlaps the host->device copy with compute."""
from utils import DataError

from .build import build_datasets, build_loader, build_loaders, build_mixup, data_num_classes
from .decode import DecodeError
from .device_prep import DevicePreprocessor
from .prefetch import DevicePrefetcher

__all__ = ['build_datasets', 'build_loader', 'build_loaders', 'build_mixup', 'data_num_classes', 'DevicePreprocessor',
           'DevicePrefetcher', 'DataError', 'DecodeError']
