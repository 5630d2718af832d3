"""Layer 3: the networks, outside extractors and the stacked model (members, merger, logit average)."""
from .nets import FeatureNet, build_model, check_model_name, eval_mode, is_model_name, model_from_checkpoint

__all__ = ["FeatureNet", "build_model", "check_model_name", "eval_mode", "is_model_name", "model_from_checkpoint"]
