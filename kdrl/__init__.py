"""kdrl: post-train reasoning language models with RL on verifiable rewards, knowledge
distillation from a teacher, or both in one objective (KDRL)."""

__version__ = "0.1.0"
