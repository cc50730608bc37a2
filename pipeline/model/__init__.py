"""The MCULoRA network: MCLA adapted linears, modality encoders, losses and checkpoints."""
from pipeline.model.checkpoint import load_model, save_model
from pipeline.model.config import ModelConfig
from pipeline.model.losses import orthogonality_loss, task_loss
from pipeline.model.mcla import MCLALinear, active_combination, set_active_combination
from pipeline.model.network import MCULoRANet, ModelOutput

__all__ = ["MCLALinear", "MCULoRANet", "ModelConfig", "ModelOutput", "active_combination", "load_model",
           "orthogonality_loss", "save_model", "set_active_combination", "task_loss"]
