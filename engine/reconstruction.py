"""SimMIM pre-training's view of the validation images: the mean reconstruction loss (the
same center crops and masks every epoch, every image counted once at any world size) and a
picture of a few of them: original, masked input, reconstruction, side by side."""
from __future__ import annotations

import logging
import os
import time

import numpy as np
import torch
import torch.nn as nn
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from data.datasets import collate_channels_last
from data.prefetch import DevicePrefetcher
from distributed.parallel import is_sharded
from distributed.process_group import all_reduce_sum, max_over_ranks
from models.simmim import local_statistics
from utils import atomic_write

from .amp import autocast_context

PICTURE_FILE = 'reconstruction_epoch{epoch:03d}.png'
PICTURE_IMAGES = 8  # validation images per picture (all of them in a smaller split)
PICTURE_MIN_SIDE = 128  # smaller images are shown enlarged by a whole factor


def validate_reconstruction(model: nn.Module, loader, prep, device: torch.device, amp_dtype: torch.dtype | None,
                            logger: logging.Logger) -> dict[str, float]:
    """{'val_loss', 'n_images', 'val_time'}: the SimMIM loss averaged over the images (each
    image has the same number of masked pixels, so a batch's loss is its images' mean)."""
    model.eval()
    sharded = is_sharded(model)
    start = time.perf_counter()
    sums = torch.zeros(2, dtype=torch.float64, device=device)  # loss x images, images
    # FSDP gathers weights in every forward: ranks with fewer batches run throw-away ones
    rounds = max_over_ranks(len(loader), device) if sharded else len(loader)
    with torch.no_grad() if sharded else torch.inference_mode():
        images = masks = None
        for images, masks in DevicePrefetcher(loader, prep):
            with autocast_context(amp_dtype, device):
                loss = model(images, masks).float()
            sums += torch.stack([loss.double() * images.shape[0],
                                 torch.full((), images.shape[0], dtype=torch.float64, device=device)])
        for _ in range(rounds - len(loader)):
            with autocast_context(amp_dtype, device):
                model(images[:1], masks[:1])
    all_reduce_sum(sums)
    total, seen = sums.tolist()
    result = {'val_loss': total / max(seen, 1), 'n_images': int(round(seen)), 'val_time': time.perf_counter() - start}
    logger.info(f' * reconstruction loss {result["val_loss"]:.4f} on {result["n_images"]} images')
    return result


def _to_uint8(images: torch.Tensor) -> np.ndarray:
    """Normalized (B, 3, H, W) -> (B, H, W, 3) uint8 pixels."""
    mean = torch.tensor(IMAGENET_DEFAULT_MEAN, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_DEFAULT_STD, device=images.device).view(1, 3, 1, 1)
    pixels = (images.float() * std + mean).clamp(0, 1).mul(255).round().byte()
    return pixels.permute(0, 2, 3, 1).cpu().numpy()


def _predicted_pixels(model, images: torch.Tensor, predicted: torch.Tensor) -> torch.Tensor:
    """The prediction in the images' normalization: with NORM_TARGET it predicts locally
    standardized pixels, shown with the original's local mean and spread."""
    if not model.norm_target:
        return predicted
    mean, std = local_statistics(images, model.norm_target_patch_size)
    return predicted * std + mean


def picture_batch(dataset, prep) -> tuple[torch.Tensor, torch.Tensor]:
    """PICTURE_IMAGES validation images spread over the split (folders are sorted by class),
    with their masks: the same ones every epoch."""
    picks = sorted({int(i) for i in np.linspace(0, len(dataset) - 1, PICTURE_IMAGES).round()})
    return prep(*collate_channels_last([dataset[i] for i in picks]))


@torch.no_grad()
def reconstruction_picture(model: nn.Module, images: torch.Tensor, masks: torch.Tensor,
                           amp_dtype: torch.dtype | None) -> np.ndarray:
    """Rows of [original | masked input (masked patches grey) | reconstruction (the visible
    pixels kept, the masked ones predicted)] as one (rows x H, 3 x W, 3) uint8 picture."""
    model.eval()
    with autocast_context(amp_dtype, images.device):
        predicted = model(images, masks, reconstruct=True).float()
    hidden = model.pixel_mask(masks).bool()  # (B, 1, H, W)
    filled = torch.where(hidden, _predicted_pixels(model, images.float(), predicted), images.float())
    original, masked, rebuilt = _to_uint8(images), _to_uint8(images), _to_uint8(filled)
    masked[hidden[:, 0].cpu().numpy()] = 128
    rows = [np.concatenate([o, m, r], axis=1) for o, m, r in zip(original, masked, rebuilt)]
    picture = np.concatenate(rows, axis=0)
    zoom = max(1, PICTURE_MIN_SIDE // images.shape[-1])  # small images enlarged (nearest) to be seen
    return picture.repeat(zoom, axis=0).repeat(zoom, axis=1)


def write_picture(picture: np.ndarray, output: str, epoch: int, writer) -> str:
    """The PNG in the output folder (written atomically) and, when on, in TensorBoard."""
    path = os.path.join(output, PICTURE_FILE.format(epoch=epoch))
    atomic_write(path, lambda f: Image.fromarray(picture).save(f, format='PNG'))
    if writer is not None:
        writer.add_image('reconstruction', picture, epoch, dataformats='HWC')
        writer.flush()
    return path


def pretraining_record(trainer, epoch: int, result) -> dict:
    """SimMIM pre-training's end of epoch: the reconstruction loss of the model (and the
    EMA) for metrics.jsonl, and every SAVE_FREQ epochs and at the last the picture of
    PICTURE_IMAGES validation images (every rank runs the forward, as FSDP needs; rank 0
    writes)."""
    t, config = trainer, trainer.config
    val = validate_reconstruction(t.eval_module, t.loader_val, t.prep_val, t.device, t.amp_dtype, t.logger)
    record = {'epoch': epoch, 'train_loss': result.train_loss, 'val_loss': val['val_loss'], 'lr': result.lr,
              'img_per_s': result.img_per_s, 'n_images': val['n_images'], 'updates': result.updates,
              'train_time': result.train_time}
    if t.ema is not None:
        ema = validate_reconstruction(t.ema.module, t.loader_val, t.prep_val, t.device, t.amp_dtype, t.logger)
        record['ema_val_loss'] = ema['val_loss']
    if epoch % config.SAVE_FREQ == 0 or epoch == config.TRAIN.EPOCHS - 1:
        images, masks = picture_batch(t.loader_val.dataset, t.prep_val)
        picture = reconstruction_picture(t.model, images, masks, t.amp_dtype)
        if t.ctx.is_main:
            t.logger.info(f'reconstructions: {write_picture(picture, config.OUTPUT, epoch, t.metrics.writer)}')
    return record
