from .build import build_model


def logits_of(outputs):
    """A classifier's logits from its forward: Swin-MoE returns (logits, auxiliary loss), as
    the official model does; the others the logits alone."""
    return outputs[0] if isinstance(outputs, tuple) else outputs


__all__ = ['build_model', 'logits_of']
