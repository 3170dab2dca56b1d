"""Labelled grids: column labels wrap at spaces instead of being cut to a few characters ("red triang")."""

from __future__ import annotations

import torch
from PIL import Image, ImageDraw

from diffalign.eval.grid import LINE_HEIGHT, labelled_grid, wrap_label


def test_labels_wrap_at_spaces_and_keep_every_word(tmp_path) -> None:
    draw = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    width = draw.textlength("yellow triangle")  # 69 px in Pillow's default font
    assert wrap_label(draw, "yellow triangle", int(width)) == ["yellow triangle"]
    assert wrap_label(draw, "yellow triangle", int(width) - 1) == ["yellow", "triangle"]
    assert wrap_label(draw, "a b c", 64) == ["a b c"]
    assert all(draw.textlength(line) <= 20 for line in wrap_label(draw, "supercalifragilistic", 20))
    rows = [torch.rand(3, 3, 16, 16), torch.rand(3, 3, 16, 16)]
    one = Image.open(labelled_grid(rows, ["a", "b"], tmp_path / "one.png", column_labels=["red", "blue", "green"]))
    two = Image.open(labelled_grid(rows, ["a", "b"], tmp_path / "two.png", column_labels=["yellow triangle", "b", "c"]))
    assert two.size[1] - one.size[1] == LINE_HEIGHT and one.size[0] == two.size[0] == 120 + 3 * 66
