"""Random erasing (Zhong et al.) of a whole batch in a few tensor operations, with the
distribution of timm's `RandomErasing` as the official pipeline configures it (AUG.REPROB,
REMODE, RECOUNT; area 2% to 1/3 of the image, aspect 0.3 to 1/0.3, up to ten tries per
rectangle). timm draws each sample in a Python loop, several small kernels per image; here
every draw of the batch is one tensor, so a step costs the same few kernels at any batch size.

Per sample: erased with probability REPROB; then `count` rectangles, `count` uniform in
1..RECOUNT, each of area fraction uniform(0.02, 1/3) / count and log-uniform aspect, the first
of ten tries that fits strictly inside the image, placed uniformly; a rectangle with no try
that fits is left out. Filled with per-pixel normal noise ('pixel'), one normal colour per
rectangle ('rand') or zeros ('const').
"""
from __future__ import annotations

import math

import torch

MIN_AREA, MAX_AREA = 0.02, 1 / 3
MIN_ASPECT = 0.3
TRIES = 10


class BatchRandomErasing:
    def __init__(self, probability: float, mode: str = 'pixel', max_count: int = 1):
        self.probability, self.mode, self.max_count = probability, mode.lower(), max_count
        self.log_aspect = (math.log(MIN_ASPECT), math.log(1 / MIN_ASPECT))

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """`images` (B, C, H, W) with the drawn rectangles erased (a new tensor)."""
        B, C, H, W = images.shape
        dev = images.device
        erased = torch.rand(B, device=dev) < self.probability
        count = torch.randint(1, self.max_count + 1, (B,), device=dev)
        for slot in range(self.max_count):
            h, w, fits = self._sizes(B, H, W, count, dev)
            use = erased & (slot < count) & fits
            top = (torch.rand(B, device=dev) * (H - h + 1)).floor().long()  # uniform in 0..H-h
            left = (torch.rand(B, device=dev) * (W - w + 1)).floor().long()
            rows = torch.arange(H, device=dev)
            cols = torch.arange(W, device=dev)
            inside = (((rows >= top[:, None]) & (rows < (top + h)[:, None]))[:, :, None]
                      & ((cols >= left[:, None]) & (cols < (left + w)[:, None]))[:, None, :])
            mask = (inside & use[:, None, None])[:, None]  # (B, 1, H, W)
            images = torch.where(mask, self._fill(images, B, C), images)
        return images

    def _sizes(self, B: int, H: int, W: int, count: torch.Tensor, dev: torch.device):
        """(h, w, fits) per sample: the first of TRIES draws that fits inside the image."""
        draws = torch.empty(2, B, TRIES, device=dev, dtype=torch.float64)
        area = draws[0].uniform_(MIN_AREA, MAX_AREA) * (H * W) / count[:, None]
        aspect = draws[1].uniform_(*self.log_aspect).exp()
        h = torch.round(torch.sqrt(area * aspect)).long()
        w = torch.round(torch.sqrt(area / aspect)).long()
        ok = (h < H) & (w < W)
        first = ok.int().argmax(dim=1, keepdim=True)  # 0 when none fits; `fits` says so
        return h.gather(1, first)[:, 0], w.gather(1, first)[:, 0], ok.any(dim=1)

    def _fill(self, images: torch.Tensor, B: int, C: int) -> torch.Tensor:
        if self.mode == 'pixel':
            return torch.randn_like(images)
        if self.mode == 'rand':
            return torch.randn(B, C, 1, 1, device=images.device, dtype=images.dtype)
        return torch.zeros((), device=images.device, dtype=images.dtype)
