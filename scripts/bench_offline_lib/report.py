"""The LoRA benchmark's results as printed: ratios between contenders, the targets they are held to, the table
and the ``key=value`` lines."""

from __future__ import annotations

from typing import Any

from diffalign.utils.benchmark import format_table

from .common import Settings

TARGETS = {  # the issues' targets, at equal batch, resolution, LoRA rank and DataLoader workers
    "cached_vs_floor_step_time_ratio": ("<=", 1.10),
    "uncached_vs_diffusers_pairs_per_s_ratio": (">=", 1.2),
    "uncached_vs_diffusers_peak_rss_ratio": ("<=", 1.0),
    "cached_vs_diffusers_pairs_per_s_ratio": (">=", 3.0),
}


def ratios(results: dict[str, Any]) -> dict[str, float]:
    out: dict[str, float] = {}

    def ratio(a: str, b: str, key: str) -> float:
        return results[a][key] / results[b][key]

    if "floor" in results:
        for name in ("ours_cached", "ours_uncached", "diffusers"):
            if name in results:
                short = name.removeprefix("ours_")
                out[f"{short}_vs_floor_step_time_ratio"] = ratio(name, "floor", "seconds_per_step")
        out["cached_vs_floor_peak_rss_ratio"] = ratio("ours_cached", "floor", "peak_rss_mib")
    out["cached_vs_uncached_pairs_per_s_ratio"] = ratio("ours_cached", "ours_uncached", "pairs_per_s")
    if "diffusers" in results:
        out["cached_vs_diffusers_pairs_per_s_ratio"] = ratio("ours_cached", "diffusers", "pairs_per_s")
        out["uncached_vs_diffusers_pairs_per_s_ratio"] = ratio("ours_uncached", "diffusers", "pairs_per_s")
        out["uncached_vs_diffusers_peak_rss_ratio"] = ratio("ours_uncached", "diffusers", "peak_rss_mib")
        out["cached_vs_diffusers_peak_rss_ratio"] = ratio("ours_cached", "diffusers", "peak_rss_mib")
    # the same comparisons in CPU seconds per step (work done, whoever else shares the machine; with DataLoader
    # workers it adds their CPU time, so it is not a throughput)
    if "floor" in results:
        out["cached_vs_floor_cpu_time_ratio"] = ratio("ours_cached", "floor", "cpu_seconds_per_step")
    if "diffusers" in results:
        out["diffusers_vs_uncached_cpu_time_ratio"] = ratio("diffusers", "ours_uncached", "cpu_seconds_per_step")
    return out


def target_lines(values: dict[str, float], targets: dict[str, tuple[str, float]]) -> list[str]:
    lines = []
    for key, (op, bound) in targets.items():
        if key in values:
            ok = values[key] >= bound if op == ">=" else values[key] <= bound
            lines.append(f"target {key} {op} {bound:g}: {'PASS' if ok else 'FAIL'} ({values[key]:.3f})")
    return lines


def report(results: dict[str, Any], rat: dict[str, float], s: Settings) -> None:
    floor = results.get("floor", {}).get("seconds_per_step")
    floor_cpu = results.get("floor", {}).get("cpu_seconds_per_step")
    other = "median" if s.statistic == "min" else "min"
    rows = []
    for name, r in results.items():
        in_proc = r["in_process_step_s"]
        rows.append(
            [
                name,
                f"{r['pairs_per_s']:.2f}",
                f"{r['seconds_per_step'] * 1000:.1f}",
                "-" if not floor else f"{r['seconds_per_step'] / floor:.2f}",
                f"{r[f'seconds_per_step_{other}'] * 1000:.1f}",
                "-" if in_proc is None else f"{in_proc * 1000:.1f}",
                f"{r['cpu_seconds_per_step'] * 1000:.1f}",
                "-" if not floor_cpu else f"{r['cpu_seconds_per_step'] / floor_cpu:.2f}",
                f"{r['fixed_cost_s']:.1f}",
                f"{r['peak_rss_mib']:.0f}",
            ]
        )
    headers = ["contender", "pairs/s", "ms/step", "x floor", f"ms/step ({other})", "in-proc ms/step", "CPU ms/step"]
    headers += ["CPU x floor", "fixed s", "RSS MiB"]
    print()
    print(describe(s))
    print(format_table(headers, rows))
    print()
    for name, r in results.items():
        print(f"{name}_pairs_per_s={r['pairs_per_s']:.4g}")
        print(f"{name}_seconds_per_step={r['seconds_per_step']:.4g}")
        print(f"{name}_peak_rss_mib={r['peak_rss_mib']:.1f}")
    for key, value in rat.items():
        print(f"{key}={value:.3f}")
    for line in target_lines(rat, TARGETS):
        print(line)


def describe(s: Settings) -> str:
    latent = s.resolution // 2 ** (s.vae_levels - 1)
    sizes = f"{s.image_min}" if s.image_min == s.image_max else f"{s.image_min}-{s.image_max}"
    return (
        f"batch {s.batch_size} pairs, resolution {s.resolution} (latent {latent}, {s.vae_levels}-level VAE), "
        f"LoRA rank {s.rank}, {s.pairs} pairs of {s.images} {sizes} px, threads {s.threads}, workers "
        f"{s.num_workers}, device {s.device}, steps {s.short_steps}->{s.long_steps} x{s.repeats} ({s.statistic} "
        "of the repeats)"
    )
