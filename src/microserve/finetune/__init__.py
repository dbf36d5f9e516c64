"""Customization: LoRA adapters trained on a user's data (``microserve tune`` and the fine-tuning jobs API).

The training stack (torch, transformers, peft, accelerate, matplotlib) is the ``tune`` extra; modules import it
only where they train, so validating data and managing jobs work without it.
"""
