"""The RL placer: a seq2seq policy (policy.py) and its trainer (trainer.py)."""

from placer.rl.policy import Seq2SeqPolicy, load_policy, save_policy
from placer.rl.trainer import TrainConfig, TrainResult, train

__all__ = ["Seq2SeqPolicy", "load_policy", "save_policy", "TrainConfig", "TrainResult", "train"]
