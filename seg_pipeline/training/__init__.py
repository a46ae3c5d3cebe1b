"""Training building blocks: SMP model factory, losses (incl. knowledge distillation), loops.

Everything here is plain PyTorch / segmentation-models-pytorch so it can be reused outside
Dagster (notebooks, torchrun jobs); the Dagster layer only calls into it.
"""
