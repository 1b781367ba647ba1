"""The RL placer: a seq2seq policy with a graph encoder (policy.py), its trainer
(trainer.py: REINFORCE and PPO), the micro-batch counts it searches, each with its own
incumbent (counts.py), and its files (checkpoint.py)."""

from placer.rl.checkpoint import load_policy, save_policy
from placer.rl.policy import Seq2SeqPolicy
from placer.rl.trainer import TrainConfig, train

__all__ = ["Seq2SeqPolicy", "load_policy", "save_policy", "TrainConfig", "train"]
