"""The MCULoRA network: MCLA adapted linears, modality encoders, losses and checkpoints."""
from pipeline.methods.checkpoint import load_model, save_model
from pipeline.methods.config import ModelConfig
from pipeline.methods.losses import orthogonality_loss, task_loss
from pipeline.methods.mcla import MCLALinear, active_combination, set_active_combination
from pipeline.methods.mculora import MCULoRANet, ModelOutput

__all__ = ["MCLALinear", "MCULoRANet", "ModelConfig", "ModelOutput", "active_combination", "load_model",
           "orthogonality_loss", "save_model", "set_active_combination", "task_loss"]
