"""Training on the project's stack: recipes, data (sources, feature store, extraction, loader), the compiled step,
checkpoints, the shared loop, and the two recipes that use them (Next-DiT flow matching, the VAE)."""

from .checkpoints import latest_checkpoint, load_checkpoint, save_checkpoint
from .data import buckets, load_image
from .loop import data_parallel_world, fit, run_tool
from .nextdit import export_pipeline, open_samples, train
from .recipe import Recipe, TrainConfig, lr_at
from .step import ADAM_BETAS, ADAM_EPS, FlowMatchingLoss, Trainer

__all__ = ["ADAM_BETAS", "ADAM_EPS", "FlowMatchingLoss", "Recipe", "TrainConfig", "Trainer", "buckets",
           "data_parallel_world", "export_pipeline", "fit", "latest_checkpoint", "load_checkpoint", "load_image",
           "lr_at", "open_samples", "run_tool", "save_checkpoint", "train"]  # fmt: skip
