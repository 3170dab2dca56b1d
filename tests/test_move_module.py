"""``move_module`` skips no-op dtype casts (diffusers warns on every one) and still performs real ones."""

from __future__ import annotations

import logging

import torch
from diffusers import UNet2DModel

from diffalign.utils.modules import move_module


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def test_no_op_cast_is_skipped_and_real_cast_happens() -> None:
    net = UNet2DModel(
        sample_size=8,
        block_out_channels=(8,),
        down_block_types=("DownBlock2D",),
        up_block_types=("UpBlock2D",),
        layers_per_block=1,
        norm_num_groups=4,
    )
    collect = _Collect()
    logger = logging.getLogger("diffusers.models.modeling_utils")
    logger.addHandler(collect)
    try:
        net.to("cpu", torch.float32)  # diffusers itself warns on a no-op cast: the reason move_module exists
        assert any("kept in float32" in m for m in collect.messages)
        collect.messages.clear()
        assert move_module(net, "cpu", torch.float32) is net
        assert collect.messages == []
        move_module(net, "cpu", torch.bfloat16)
        assert {p.dtype for p in net.parameters()} == {torch.bfloat16}
        move_module(net, None, None)
        assert {p.dtype for p in net.parameters()} == {torch.bfloat16}
    finally:
        logger.removeHandler(collect)
