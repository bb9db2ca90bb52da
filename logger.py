"""Logging: a colored console on rank 0 and one plain-text file per rank."""
from __future__ import annotations

import logging
import os
import sys

from termcolor import colored

_FMT = '[%(asctime)s %(name)s] (%(filename)s %(lineno)d): %(levelname)s %(message)s'
_DATEFMT = '%Y-%m-%d %H:%M:%S'


def create_logger(output_dir: str, dist_rank: int = 0, name: str = '') -> logging.Logger:
    """Logger writing to `output_dir/log_rank{dist_rank}.txt`, and to stdout on rank 0.

    Calling it again with the same name replaces the handlers instead of adding
    duplicates, so tests and notebooks may build several runs in one process.
    """
    logger = logging.getLogger(name)
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
        handler.close()

    if dist_rank == 0:
        color_fmt = (colored('[%(asctime)s %(name)s]', 'green')
                     + colored('(%(filename)s %(lineno)d)', 'yellow') + ': %(levelname)s %(message)s')
        console = logging.StreamHandler(sys.stdout)
        console.setLevel(logging.DEBUG)
        console.setFormatter(logging.Formatter(fmt=color_fmt, datefmt=_DATEFMT))
        logger.addHandler(console)

    os.makedirs(output_dir, exist_ok=True)
    file_handler = logging.FileHandler(os.path.join(output_dir, f'log_rank{dist_rank}.txt'), mode='a')
    file_handler.setLevel(logging.DEBUG)
    file_handler.setFormatter(logging.Formatter(fmt=_FMT, datefmt=_DATEFMT))
    logger.addHandler(file_handler)
    return logger
