"""distill: knowledge distillation of transformer language models on DeepSpeed ZeRO-3."""

__version__ = "0.1.0"
