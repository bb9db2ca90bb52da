"""Freezing for fine-tuning, shared by the Swin models (V1 and V2): a linear probe or the
first stages kept out of training, and out of train mode."""
from __future__ import annotations


class FreezableStages:
    """Mixin for a Swin classifier with `patch_embed`, `pos_drop`, `layers`, `head` and an
    optional `absolute_pos_embed` (when `ape`); put it before nn.Module in the bases."""

    _frozen: tuple[str, ...] = ()  # names of submodules `freeze` took out of training

    def freeze(self, stages: int = 0, head_only: bool = False) -> list[str]:
        """Stop training the patch embedding (and absolute position embedding) and the first
        `stages` stages, or everything but the classifier with `head_only`. Frozen parts also
        stay in eval mode, so stochastic depth and dropout leave them alone, as detection
        backbones freeze stages. Returns the names of the frozen parts."""
        if head_only:
            names = [name for name, _ in self.named_children() if name != 'head']
        elif stages > 0:
            names = ['patch_embed', 'pos_drop'] + [f'layers.{i}' for i in range(stages)]
        else:
            return []
        for name in names:
            self.get_submodule(name).requires_grad_(False)
        if self.ape and (head_only or stages > 0):
            self.absolute_pos_embed.requires_grad_(False)
            names.append('absolute_pos_embed')
        self._frozen = tuple(n for n in names if n != 'absolute_pos_embed')
        self.train(self.training)
        return names

    def train(self, mode: bool = True) -> FreezableStages:
        super().train(mode)
        for name in self._frozen:
            self.get_submodule(name).eval()
        return self
