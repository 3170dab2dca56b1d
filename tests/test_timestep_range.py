"""``model.min/max_timestep_fraction``: training timesteps drawn from the density truncated to t/T in [lo, hi]; the
default range leaves every draw as it was, and a narrower range keeps each in-range draw."""

from __future__ import annotations

import pytest
import torch
from helpers_adapters import sd3_adapter

from diffalign.config import load_config
from diffalign.errors import DiffalignError
from diffalign.models.loading import adapter_from_config, load_adapter
from diffalign.models.tiny_sd3 import tiny_sd3_components
from diffalign.utils.randomness import TIMESTEP, per_sample_randint


def test_ddpm_range_is_uniform_on_the_integer_interval(tiny_sd_dirs) -> None:
    adapter = load_adapter(tiny_sd_dirs["eps"])
    default = adapter.sample_timesteps(0, 0, range(3000))
    assert torch.equal(default, per_sample_randint(1000, 0, 0, range(3000), TIMESTEP))  # unchanged default
    adapter.timestep_range = (0.25, 0.5)
    t = adapter.sample_timesteps(0, 0, range(3000))
    assert int(t.min()) == 250 and int(t.max()) == 499  # {250, ..., 499}, all reached with 3000 draws
    assert torch.equal(t, per_sample_randint(250, 0, 0, range(3000), TIMESTEP) + 250)


def test_flow_range_truncates_the_logit_normal_density() -> None:
    adapter = sd3_adapter(tiny_sd3_components(seed=0))
    default = adapter.sample_timesteps(0, 0, range(2000)) / 1000
    adapter.timestep_range = (0.25, 0.75)
    sigma = adapter.sample_timesteps(0, 0, range(2000)) / 1000
    assert float(sigma.min()) >= 0.25 and float(sigma.max()) <= 0.75
    inside = (default >= 0.25) & (default <= 0.75)
    assert 0.2 < float(inside.float().mean()) < 0.9  # the range cuts a real part of the density
    assert torch.equal(sigma[inside], default[inside])  # an in-range first draw is kept
    # truncation keeps the shape inside the range: the share below 0.5 matches the conditional share of the default
    # draws (2000 fixed draws each; binomial s.d. about 0.015, so 0.06 is 4 s.d.)
    conditional = float((default[inside] < 0.5).float().mean())
    assert abs(float((sigma < 0.5).float().mean()) - conditional) < 0.06


def test_config_range_reaches_the_adapter_and_is_checked(tmp_path, tiny_sd_dirs) -> None:
    config = tmp_path / "c.yaml"
    config.write_text(f"model:\n  pretrained: {tiny_sd_dirs['eps']}\ndata:\n  path: x.parquet\n")
    cfg = load_config(config, ["model.min_timestep_fraction=0.3", "model.max_timestep_fraction=0.9"])
    assert adapter_from_config(cfg.model).timestep_range == (0.3, 0.9)
    with pytest.raises(DiffalignError, match="model.min_timestep_fraction' must be a fraction below"):
        load_config(config, ["model.min_timestep_fraction=0.6", "model.max_timestep_fraction=0.5"])
