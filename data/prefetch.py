"""One-batch look-ahead for the training and validation loops: while the model computes on
batch n, batch n+1 is already taken from the loader and, on CUDA, copied to the device on
a side stream, so the copy overlaps compute instead of preceding it."""
from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator

import torch

Batch = tuple[torch.Tensor, torch.Tensor]


class DevicePrefetcher:
    """Iterates `(images, targets)` of `loader` already on the device and through `prep`
    (a `data.DevicePreprocessor`), one batch ahead.

    Only the loader read and the host->device copy run ahead; `prep` (normalization, random
    erasing) runs when a batch is handed out, on the current stream, so the random numbers
    are drawn in the same order as without look-ahead and a resumed run continues exactly.
    On the CPU there is no copy and no stream: the batches are those of the plain loop.
    `wait_s` adds up the time spent blocked on the loader (the loop's "data" time).
    """

    def __init__(self, loader: Iterable, prep: Callable[[torch.Tensor, torch.Tensor], Batch]):
        self.loader, self.prep = loader, prep
        # a prep without a device (a stand-in in a test) gets the plain, stream-less path
        self.device: torch.device = getattr(prep, 'device', torch.device('cpu'))
        self.stream: torch.cuda.Stream | None = (torch.cuda.Stream(device=self.device)
                                                    if self.device.type == 'cuda' else None)
        self.wait_s = 0.0

    def __len__(self) -> int:
        return len(self.loader)

    def _fetch(self, batches: Iterator) -> Batch | None:
        """The next loader batch with its copy to the device queued (None at the end)."""
        tic = time.perf_counter()
        try:
            images, targets = next(batches)
        except StopIteration:
            return None
        finally:
            self.wait_s += time.perf_counter() - tic
        if self.stream is None:
            return images, targets
        # pinned host memory (DATA.PIN_MEMORY) makes these copies asynchronous
        with torch.cuda.stream(self.stream):
            return (images.to(self.device, non_blocking=True), targets.to(self.device, non_blocking=True))

    def _ready(self, batch: Batch) -> Batch:
        images, targets = batch
        if self.stream is not None:
            current = torch.cuda.current_stream(self.device)
            current.wait_stream(self.stream)
            # the tensors were allocated on the side stream: keep the allocator from
            # reusing their memory before the current stream is done with them
            images.record_stream(current)
            targets.record_stream(current)
        return self.prep(images, targets)

    def __iter__(self) -> Iterator[Batch]:
        batches = iter(self.loader)
        upcoming = self._fetch(batches)
        while upcoming is not None:
            ready = self._ready(upcoming)  # the wait covers this batch's copy, not the next one's
            upcoming = self._fetch(batches)
            yield ready
