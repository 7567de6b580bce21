"""safelora: Safe LoRA (Hsu et al., NeurIPS 2024) for PEFT LoRA adapters, on checkpoint files.

The library is importable for batch scripts; the command line (``safelora``) is a thin layer
over it. Importing this package does not import torch.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
