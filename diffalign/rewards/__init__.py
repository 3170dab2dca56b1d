"""Reward models behind one call: ``reward(images (N,3,H,W) in [0,1], prompts) -> float32 (N,)``.

See :mod:`diffalign.rewards.base` for the protocol and :func:`build_reward` / :func:`build_rewards` for the registry.
"""

from diffalign.rewards.aesthetic import AestheticMLP, LAIONAesthetic
from diffalign.rewards.base import (
    EmbeddingReward,
    RewardModel,
    check_images,
    load_state_dict_file,
    resolve_checkpoint,
)
from diffalign.rewards.clip_score import CLIP_SCORE_SCALES, CLIPScore, HFCLIPReward
from diffalign.rewards.combine import WeightedSum
from diffalign.rewards.hpsv2 import HPS_CHECKPOINTS, HPSv2
from diffalign.rewards.jpeg import JPEGCompressibility
from diffalign.rewards.pickscore import PickScore
from diffalign.rewards.preprocess import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, CLIPPreprocess, clip_preprocess
from diffalign.rewards.registry import REWARDS, build_reward, build_rewards, register_reward, reward_names

__all__ = [
    "CLIP_SCORE_SCALES",
    "HPS_CHECKPOINTS",
    "OPENAI_CLIP_MEAN",
    "OPENAI_CLIP_STD",
    "REWARDS",
    "AestheticMLP",
    "CLIPPreprocess",
    "CLIPScore",
    "EmbeddingReward",
    "HFCLIPReward",
    "HPSv2",
    "JPEGCompressibility",
    "LAIONAesthetic",
    "PickScore",
    "RewardModel",
    "WeightedSum",
    "build_reward",
    "build_rewards",
    "register_reward",
    "reward_names",
    "check_images",
    "clip_preprocess",
    "load_state_dict_file",
    "resolve_checkpoint",
]
