"""The floor contender's training loop, run inside a subprocess as ``bench_offline.py --worker floor``: Diffusion-DPO
LoRA steps on model inputs built in memory before the loop (the floor no data pipeline can beat)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .common import LEARNING_RATE, LORA_TARGETS, MAX_GRAD_NORM, OURS_BETA, WEIGHT_DECAY


def floor_worker(spec: dict[str, Any], steps: int, output: Path) -> None:
    """The floor contender (run as ``--worker floor``): ``steps`` Diffusion-DPO LoRA steps on tensors in memory.

    Set-up, not timed by the difference method since it is the same in every run: the UNet (``from_pretrained``)
    and peft LoRA after ``accelerate.utils.set_seed`` (as ours and diffusers: the same gaussian ``lora_A``), the
    cached latents and text embeddings of ``ours_cached`` for ``prepare_steps`` micro-batches in ours' order
    (``EpochBatches``), flips (the cache's read-time choice) and per-sample noise / timesteps, turned into the 2B-row
    model inputs ``x_t = sqrt(a)·x0 + sqrt(1 - a)·noise`` in float32 as ours computes them. The loop then does nothing
    but the training computation, in ours' order. Writes ``floor.json``: per-step losses and loop-body seconds.
    """
    import time

    import torch
    import torch.nn.functional as F  # noqa: N812
    from accelerate.utils import set_seed
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from peft import LoraConfig
    from peft.tuners.tuners_utils import BaseTunerLayer

    from diffalign.data import CachedPreferenceDataset, PreferencePairDataset, load_preference_table
    from diffalign.trainers.batching import EpochBatches
    from diffalign.utils.randomness import NOISE, TIMESTEP, per_sample_normal, per_sample_randint

    device = torch.device("cuda" if spec["device"] == "auto" and torch.cuda.is_available() else "cpu")
    seed, batch = spec["seed"], spec["batch_size"]
    set_seed(seed)
    unet = UNet2DConditionModel.from_pretrained(spec["model_dir"], subfolder="unet").to(device)
    unet.requires_grad_(False)
    rank = spec["rank"]
    lora = LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules=list(LORA_TARGETS))
    unet.add_adapter(lora)
    params = [p for p in unet.parameters() if p.requires_grad]
    for p in params:
        p.data = p.data.float()
    layers = [m for m in unet.modules() if isinstance(m, BaseTunerLayer)]
    optimizer = torch.optim.AdamW(params, lr=LEARNING_RATE, betas=(0.9, 0.999), eps=1e-8, weight_decay=WEIGHT_DECAY)
    alphas_cumprod = DDPMScheduler.from_pretrained(spec["model_dir"], subfolder="scheduler").alphas_cumprod.float()
    num_timesteps = alphas_cumprod.shape[0]

    table = load_preference_table(spec["data_dir"], split="train")
    pixels = PreferencePairDataset(table, resolution=spec["resolution"], random_crop=False, hflip=True, seed=seed)
    folders = [
        p.parent
        for p in sorted(Path(spec["cache_dir"]).glob("*/manifest.json"))
        if json.loads(p.read_text())["data_fingerprint"] == pixels.fingerprint
    ]
    if len(folders) != 1:
        raise RuntimeError(f"{spec['cache_dir']}: expected one cache of this data set (run ours_cached first)")
    data = CachedPreferenceDataset(folders[0], pixels)
    order = EpochBatches(len(data), batch, seed=seed)
    prepared = []
    for k in range(spec["prepare_steps"]):
        epoch, indices = order.local_indices(k)
        data.set_epoch(epoch)
        items = [data[i] for i in indices]
        x0 = torch.stack([it["latents_chosen"] for it in items] + [it["latents_rejected"] for it in items])
        hidden = torch.stack(
            [it["cond_chosen"]["encoder_hidden_states"] for it in items]
            + [it["cond_rejected"]["encoder_hidden_states"] for it in items]
        )
        noise = per_sample_normal(tuple(x0.shape[1:]), seed, epoch, indices, NOISE)
        timesteps = per_sample_randint(num_timesteps, seed, epoch, indices, TIMESTEP)
        noise, timesteps = torch.cat([noise, noise]), torch.cat([timesteps, timesteps])
        a = alphas_cumprod[timesteps].reshape(-1, 1, 1, 1)
        x_t = a.sqrt() * x0.float() + (1.0 - a).sqrt() * noise
        prepared.append(tuple(t.to(device) for t in (x_t, timesteps, hidden, noise)))

    unet.train()
    losses, seconds = [], []
    for k in range(steps):
        start = time.perf_counter()
        x_t, timesteps, hidden, target = prepared[k]
        pred = unet(x_t, timesteps, encoder_hidden_states=hidden, return_dict=False)[0]
        logp = -0.5 * (pred.float() - target).pow(2).mean(dim=(1, 2, 3))
        for layer in layers:
            layer._disable_adapters = True
        with torch.no_grad():
            ref = unet(x_t, timesteps, encoder_hidden_states=hidden, return_dict=False)[0]
        for layer in layers:
            layer._disable_adapters = False
        ref_logp = -0.5 * (ref.float() - target).pow(2).mean(dim=(1, 2, 3))
        rho = logp - ref_logp
        loss = -F.logsigmoid(OURS_BETA * (rho[:batch] - rho[batch:])).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, MAX_GRAD_NORM)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.detach())
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - start)
    output.mkdir(parents=True, exist_ok=True)
    (output / "floor.json").write_text(json.dumps({"losses": [float(x) for x in losses], "step_time_s": seconds}))
