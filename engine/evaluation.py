"""--eval: score the weights of --resume (strictly) or --pretrained (adapted as for
fine-tuning, but never with an untrained head) on the validation split, and the EMA weights
too when the checkpoint holds them; one metrics.jsonl line with `mode: eval`."""
from __future__ import annotations

import copy
import os

import torch.nn as nn

from checkpoints.experts import expert_names, own_model_state
from checkpoints.reading import model_state_dict, read_checkpoint
from distributed.process_group import DistContext
from models.adapt import fit_weights
from models.weights import load_model_weights

from .loops import compile_model, validate
from .metrics_log import MetricsLog


def evaluate(config, ctx: DistContext, model: nn.Module, loader_val, prep_val, amp_dtype, logger) -> int:
    """Returns the exit code (0)."""
    path = config.MODEL.RESUME or config.MODEL.PRETRAINED
    checkpoint = read_checkpoint(path)

    def load(target: nn.Module, entry: dict, source: str) -> None:
        state = model_state_dict(entry)
        if experts := expert_names(target):  # Swin-MoE: this rank's experts of the file's all
            state = own_model_state(state, target, experts, source)
        if config.MODEL.RESUME:
            load_model_weights(target, state, source)
        else:
            fit_weights(target, state, source, logger, config.MODEL.PRETRAINED_CLASS_MAP, allow_head_reinit=False)

    load(model, checkpoint, path)
    scored = [('model', model)]
    if isinstance(checkpoint.get('model_ema'), dict):
        ema = copy.deepcopy(model)
        load(ema, checkpoint['model_ema'], f'{path} (model_ema)')
        scored.append(('EMA model', ema))
    epoch = checkpoint.get('epoch')
    line = {'mode': 'eval', 'epoch': epoch if isinstance(epoch, int) else None, 'checkpoint': os.path.abspath(path),
            'train_loss': None, 'lr': None}
    for name, weights in scored:
        logger.info(f'evaluating the {name} weights of {path}')
        scorer = compile_model(weights, config, logger, f'{name} forward')
        result = validate(config, scorer, loader_val, prep_val, ctx.device, amp_dtype, logger)
        logger.info(f'Accuracy of the {name} on the {result["n_images"]} test images: '
                    f'top-1 {result["acc1"]:.2f}%  top-5 {result["acc5"]:.2f}%')
        prefix = '' if name == 'model' else 'ema_'
        line.update({f'{prefix}acc1': result['acc1'], f'{prefix}acc5': result['acc5'],
                     f'{prefix}val_loss': result['val_loss']})
        if name == 'model':
            line.update({'n_images': result['n_images'],
                         'img_per_s': result['n_images'] / max(result['val_time'], 1e-9)})
    MetricsLog(config.OUTPUT, ctx.is_main, tensorboard=False).append(line)
    return 0
