"""fedspine: federated prune-and-tune of language models on weak, heterogeneous devices.

Importing ``fedspine`` (or ``fedspine.bandit``) imports neither torch nor wandb.
"""

__version__ = "0.1.0"
