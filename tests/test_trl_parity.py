"""TRL 1.16 parity of ``diffalign.losses.dpo_family``: every DPO ``loss_type``, f-divergences, LD-DPO, WPO, mixtures
and the four reward metrics, against ``trl.DPOTrainer._compute_loss`` driven on raw tensors.

Oracle recipe (``trl/trainer/dpo_trainer.py`` ``DPOTrainer._compute_loss`` called unbound): a stub ``self`` and a fake
model that returns pre-made per-token log-probs; the reference goes in as precomputed sums (LD-adjusted by this file's
own loop when ``ld_alpha`` is set). Per-example values come from B = 1 calls, except ``aot``/``aot_unpaired`` (sort
across the batch) and ``sft`` (batch token-mean), which are compared as batch means. The TRL tier is skipped when
``trl`` is not installed (``pip install -e .[test]`` pins ``trl==1.16.0``); the non-TRL checks below it always run.
"""

from __future__ import annotations

import importlib
import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from diffalign.losses import dpo, hinge, ipo, robust
from diffalign.losses.registry import LOSSES

TRL_VERSION = "1.16.0"
LOSS_TYPES = [
    "sigmoid",
    "hinge",
    "ipo",
    "exo_pair",
    "nca_pair",
    "robust",
    "bco_pair",
    "sppo_hard",
    "aot",
    "aot_unpaired",
    "apo_zero",
    "apo_down",
    "discopop",
    "sft",
    "sigmoid_norm",
]
F_TYPES = ["sigmoid", "sigmoid_norm", "hinge", "ipo", "exo_pair", "robust", "discopop", "sft"]
BATCH_LEVEL = {"aot", "aot_unpaired", "sft"}
TOL = 1e-6
B, T = 4, 7
CHOSEN_LENS, REJECTED_LENS = [7, 3, 5, 1], [2, 7, 5, 4]
METRICS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins")


@pytest.fixture(scope="module")
def fam():
    return importlib.import_module("diffalign.losses.dpo_family")


@pytest.fixture(scope="module")
def trainer():
    trl = pytest.importorskip("trl")
    if trl.__version__ != TRL_VERSION:
        pytest.skip(f"TRL parity is pinned to trl=={TRL_VERSION}, found {trl.__version__}")
    from trl import DPOTrainer

    return DPOTrainer


# --------------------------------------------------------------------------------------------- data + oracle


def _mask(lengths: list[int], dtype: torch.dtype) -> torch.Tensor:
    return (torch.arange(T)[None, :] < torch.tensor(lengths)[:, None]).to(dtype)


def make_batch(seed: int = 0, dtype: torch.dtype = torch.float64) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    mw, ml = _mask(CHOSEN_LENS, dtype), _mask(REJECTED_LENS, dtype)

    def tok(mask: torch.Tensor, scale: float) -> torch.Tensor:
        return -(torch.rand(B, T, generator=g, dtype=torch.float64) * scale).to(dtype) * mask

    return {
        "policy_chosen_token_logps": tok(mw, 1.5),
        "policy_rejected_token_logps": tok(ml, 1.5),
        "reference_chosen_token_logps": tok(mw, 1.5),
        "reference_rejected_token_logps": tok(ml, 1.5),
        "chosen_mask": mw,
        "rejected_mask": ml,
        "chosen_log_sum_sq_probs": tok(mw, 2.0),
        "rejected_log_sum_sq_probs": tok(ml, 2.0),
    }


def ld_sums(tokens: torch.Tensor, lens: list[int], other: list[int], ld_alpha: float | None) -> torch.Tensor:
    """LD-DPO log-likelihoods by an explicit loop (independent of the code under test)."""
    out = []
    for i in range(tokens.shape[0]):
        shared = min(lens[i], other[i])
        total = 0.0
        for k in range(lens[i]):
            w = 1.0 if ld_alpha is None or k < shared else ld_alpha
            total = total + w * tokens[i, k]
        out.append(total)
    return torch.stack([torch.as_tensor(v, dtype=tokens.dtype) for v in out])


def trl_call(trainer, batch: dict, rows: list[int], *, beta: float, loss_types: list[str], **opts) -> tuple:
    """TRL 1.16 ``DPOTrainer._compute_loss`` on the given rows; returns (loss, metrics)."""
    ld_alpha = opts.get("ld_alpha")
    cl, rl = [CHOSEN_LENS[i] for i in rows], [REJECTED_LENS[i] for i in rows]
    sel = {k: v[rows] for k, v in batch.items()}
    n = len(rows)
    completion_mask = torch.cat([sel["chosen_mask"], sel["rejected_mask"]]).long()
    completion_mask = torch.cat([torch.zeros(2 * n, 1, dtype=torch.long), completion_mask], dim=1)
    log_probs = torch.cat([sel["policy_chosen_token_logps"], sel["policy_rejected_token_logps"]])
    sq = torch.cat([sel["chosen_log_sum_sq_probs"], sel["rejected_log_sum_sq_probs"]])
    outputs = SimpleNamespace(
        log_probs=log_probs,
        entropy=torch.zeros_like(log_probs),
        mean_logits=torch.zeros_like(log_probs),
        is_top1=torch.zeros_like(log_probs, dtype=torch.bool),
        log_sum_sq_probs=sq,
        aux_loss=None,
    )
    accelerator = SimpleNamespace(device=torch.device("cpu"), gather=lambda x: x, gather_for_metrics=lambda x: x)
    stub = SimpleNamespace(
        accelerator=accelerator,
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
        _total_train_tokens=0,
        _tp_size=1,
        aux_loss_enabled=False,
        model=SimpleNamespace(training=True),
        precompute_ref_logps=True,
        beta=beta,
        loss_types=list(loss_types),
        loss_weights=list(opts.get("loss_weights") or [1.0] * len(loss_types)),
        ld_alpha=ld_alpha,
        f_divergence_type=opts.get("f_divergence_type", "reverse_kl"),
        f_alpha_divergence_coef=opts.get("f_alpha_divergence_coef", 0.5),
        label_smoothing=opts.get("label_smoothing", 0.0),
        use_weighting=opts.get("use_weighting", False),
        args=SimpleNamespace(discopop_tau=opts.get("discopop_tau", 0.05), gradient_checkpointing_kwargs=None),
    )
    inputs = {
        "input_ids": torch.zeros(2 * n, T + 1, dtype=torch.long),
        "attention_mask": torch.ones(2 * n, T + 1, dtype=torch.long),
        "completion_mask": completion_mask,
        "ref_chosen_logps": ld_sums(sel["reference_chosen_token_logps"], cl, rl, ld_alpha),
        "ref_rejected_logps": ld_sums(sel["reference_rejected_token_logps"], rl, cl, ld_alpha),
    }
    loss = trainer._compute_loss(stub, lambda **kwargs: outputs, inputs, return_outputs=False)
    metrics = {k: v[-1] for k, v in stub._metrics["train"].items()}
    return float(loss), metrics


def ours(fam, batch: dict, *, beta: float, loss_types: list[str], **opts):
    if len(loss_types) == 1 and "loss_weights" not in opts:
        return getattr(fam, f"trl_{loss_types[0]}")(**batch_inputs(batch, opts), beta=beta, **opts)
    return fam.dpo_mixture(**batch_inputs(batch, opts), beta=beta, loss_types=loss_types, **opts)


def batch_inputs(batch: dict, opts: dict) -> dict:
    if opts.get("use_weighting"):
        return batch
    return {k: v for k, v in batch.items() if "sum_sq" not in k}


def check_parity(fam, trainer, *, beta: float, loss_types: list[str], dtype=torch.float64, seed=0, **opts) -> float:
    """Compare per-example losses (B = 1 calls) or the batch mean, and the four metrics; return the max abs error."""
    batch = make_batch(seed, dtype)
    out = ours(fam, batch, beta=beta, loss_types=loss_types, **opts)
    assert out.losses.shape == (B,) and out.losses.dtype == dtype
    errors = []
    trl_loss, trl_metrics = trl_call(trainer, batch, list(range(B)), beta=beta, loss_types=loss_types, **opts)
    errors.append(abs(out.losses.mean().item() - trl_loss))
    if not set(loss_types) & BATCH_LEVEL:
        for i in range(B):
            loss_i, _ = trl_call(trainer, batch, [i], beta=beta, loss_types=loss_types, **opts)
            errors.append(abs(out.losses[i].item() - loss_i))
    ours_metrics = fam.trl_reward_metrics(out)
    for key in METRICS:
        errors.append(abs(ours_metrics[key] - trl_metrics[key]))
    err = max(errors)
    assert err <= TOL, (loss_types, opts, errors)
    return err


# --------------------------------------------------------------------------------------------- TRL tier

CASES: list[tuple[str, list[str], dict]] = []
for _lt in LOSS_TYPES:
    _eps = {"exo_pair": 1e-3, "robust": 0.2, "aot": 0.1, "aot_unpaired": 0.1}.get(_lt)
    CASES.append((f"{_lt}", [_lt], {} if _eps is None else {"label_smoothing": _eps}))
CASES += [
    ("exo_pair-eps0.1", ["exo_pair"], {"label_smoothing": 0.1}),
    ("discopop-tau0.2", ["discopop"], {"discopop_tau": 0.2}),
]
for _lt in F_TYPES:
    _eps = {"exo_pair": {"label_smoothing": 0.05}, "robust": {"label_smoothing": 0.1}}.get(_lt, {})
    for _f, _coef in [
        ("forward_kl", 0.5),
        ("js_divergence", 0.5),
        ("alpha_divergence", 0.5),
        ("alpha_divergence", 0.3),
    ]:
        CASES.append(
            (f"{_lt}-{_f}-{_coef}", [_lt], {**_eps, "f_divergence_type": _f, "f_alpha_divergence_coef": _coef})
        )
CASES += [
    ("sigmoid-alpha1-fallback", ["sigmoid"], {"f_divergence_type": "alpha_divergence", "f_alpha_divergence_coef": 1.0})
]
for _lt in LOSS_TYPES:
    _eps = {"exo_pair": 1e-3, "robust": 0.2, "aot": 0.1, "aot_unpaired": 0.1}.get(_lt)
    _base = {} if _eps is None else {"label_smoothing": _eps}
    for _a in (0.0, 0.5):
        CASES.append((f"{_lt}-ld{_a}", [_lt], {**_base, "ld_alpha": _a}))
    if _lt not in ("aot", "aot_unpaired", "sft"):  # sft + WPO: see test_trl_parity_sft_wpo
        CASES.append((f"{_lt}-wpo", [_lt], {**_base, "use_weighting": True}))
CASES += [
    ("mpo", ["sigmoid", "bco_pair", "sft"], {"loss_weights": [0.8, 0.2, 1.0]}),
    ("rpo", ["sigmoid", "sft"], {"loss_weights": [1.0, 0.3]}),
    ("mix-default-weights", ["sigmoid", "apo_zero", "nca_pair"], {}),
    ("mix-js-eps", ["ipo", "exo_pair", "robust"], {"label_smoothing": 0.1, "f_divergence_type": "js_divergence"}),
    ("mix-wpo-ld", ["sigmoid", "sppo_hard"], {"loss_weights": [0.5, 2.0], "use_weighting": True, "ld_alpha": 0.3}),
    ("mix-aot", ["aot", "sigmoid_norm"], {"label_smoothing": 0.05, "loss_weights": [1.0, 0.5], "ld_alpha": 0.7}),
]


def _dtype_for(opts: dict) -> torch.dtype:
    # TRL's alpha-divergence clamp table has no float64 entry; run that case in float32.
    return torch.float32 if opts.get("f_divergence_type") == "alpha_divergence" else torch.float64


@pytest.mark.parametrize(("loss_types", "opts"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_trl_parity(fam, trainer, loss_types: list[str], opts: dict) -> None:
    for beta, seed in ((0.1, 0), (2.0, 1)):
        check_parity(fam, trainer, beta=beta, loss_types=loss_types, dtype=_dtype_for(opts), seed=seed, **opts)


def test_trl_parity_sft_wpo(fam, trainer) -> None:
    """``sft`` + ``use_weighting``: TRL 1.16 multiplies the WPO weights in place into an expanded (stride-0) tensor,
    which raises for B > 1 (upstream bug); at B = 1 it works, and there our per-pair ``sft·w(y_w)w(y_l)`` matches."""
    batch = make_batch(4)
    with pytest.raises(RuntimeError, match="single memory location"):
        trl_call(trainer, batch, list(range(B)), beta=0.5, loss_types=["sft"], use_weighting=True)
    for i in range(B):
        row = {k: v[i : i + 1] for k, v in batch.items()}
        out = fam.trl_sft(**row, beta=0.5, use_weighting=True)
        trl_loss, _ = trl_call(trainer, batch, [i], beta=0.5, loss_types=["sft"], use_weighting=True)
        assert abs(out.losses.item() - trl_loss) <= TOL


@pytest.mark.parametrize("loss_type", ["ipo", "sigmoid_norm", "sft", "sigmoid"])
def test_trl_parity_from_sums_and_lengths(fam, trainer, loss_type: str) -> None:
    """The (B,) sums + lengths path gives TRL's values too (what a caller without per-token tensors uses)."""
    batch = make_batch(3)
    sums = {
        "policy_chosen_logps": batch["policy_chosen_token_logps"].sum(1),
        "policy_rejected_logps": batch["policy_rejected_token_logps"].sum(1),
        "reference_chosen_logps": batch["reference_chosen_token_logps"].sum(1),
        "reference_rejected_logps": batch["reference_rejected_token_logps"].sum(1),
        "chosen_lengths": torch.tensor(CHOSEN_LENS, dtype=torch.float64),
        "rejected_lengths": torch.tensor(REJECTED_LENS, dtype=torch.float64),
    }
    out = getattr(fam, f"trl_{loss_type}")(**sums, beta=0.5)
    trl_loss, trl_metrics = trl_call(trainer, batch, list(range(B)), beta=0.5, loss_types=[loss_type])
    assert abs(out.losses.mean().item() - trl_loss) <= TOL
    for key, value in fam.trl_reward_metrics(out).items():
        assert abs(value - trl_metrics[key]) <= TOL


# --------------------------------------------------------------------------------------------- no-TRL checks


def test_registered_names_and_keyword_only(fam) -> None:
    import inspect

    names = {f"trl_{lt}" for lt in LOSS_TYPES} | {"dpo_mixture"}
    assert tuple(fam.TRL_LOSS_TYPES) == tuple(LOSS_TYPES)
    for name in names:
        fn = LOSSES[name]
        assert fn.loss_name == name and fn.needs_reference is True and fn.kind == "paired"
        params = inspect.signature(fn).parameters.values()
        assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in params), name
        assert "TRL 1.16" in fn.__doc__ and "dpo_trainer.py" in fn.__doc__
    for diffusion_name in ("dpo", "ipo", "hinge", "robust", "kto", "poly_dpo", "sft", "mapo"):
        assert diffusion_name in LOSSES


def _pairs(seed: int = 5) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    keys = ["policy_chosen_logps", "policy_rejected_logps", "reference_chosen_logps", "reference_rejected_logps"]
    return {k: torch.randn(5, generator=g, dtype=torch.float64) for k in keys}


def test_reverse_kl_agrees_with_existing_diffusion_losses(fam) -> None:
    p = _pairs()
    lengths = {"chosen_lengths": torch.tensor([3.0, 1, 2, 5, 4]), "rejected_lengths": torch.tensor([2.0, 2, 6, 1, 3])}
    lengths = {k: v.double() for k, v in lengths.items()}
    torch.testing.assert_close(fam.trl_sigmoid(**p, beta=0.7).losses, dpo(**p, beta=0.7).losses)
    torch.testing.assert_close(fam.trl_hinge(**p, beta=0.7).losses, hinge(**p, beta=0.7).losses)
    torch.testing.assert_close(
        fam.trl_robust(**p, beta=0.7, label_smoothing=0.2).losses, robust(**p, beta=0.7, label_smoothing=0.2).losses
    )
    torch.testing.assert_close(fam.trl_ipo(**p, **lengths, beta=0.7).losses, ipo(**p, **lengths, beta=0.7).losses)
    torch.testing.assert_close(fam.trl_ipo(**p, beta=0.7).losses, ipo(**p, beta=0.7).losses)
    # TRL 1.16 `sigmoid` has no label smoothing; the diffusion `dpo` keeps cDPO under its own name.
    with pytest.raises(TypeError, match="label_smoothing"):
        fam.trl_sigmoid(**p, beta=0.7, label_smoothing=0.1)
    # policy == reference: ln 2 for the sigmoid family.
    same = {
        **p,
        "reference_chosen_logps": p["policy_chosen_logps"],
        "reference_rejected_logps": p["policy_rejected_logps"],
    }
    for fn in (fam.trl_sigmoid, fam.trl_sigmoid_norm, fam.trl_robust, fam.trl_aot, fam.trl_aot_unpaired):
        assert torch.allclose(fn(**same, beta=3.0).losses, torch.full((5,), math.log(2), dtype=torch.float64))


def test_ld_reference_as_sums_or_tokens(fam) -> None:
    """LD-DPO: a per-token reference is LD-adjusted here; a summed reference must come LD-adjusted (TRL precompute)."""
    batch = make_batch(7)
    ref_sums = {
        "reference_chosen_logps": ld_sums(batch["reference_chosen_token_logps"], CHOSEN_LENS, REJECTED_LENS, 0.4),
        "reference_rejected_logps": ld_sums(batch["reference_rejected_token_logps"], REJECTED_LENS, CHOSEN_LENS, 0.4),
    }
    policy = {k: v for k, v in batch.items() if not k.startswith("reference") and "sum_sq" not in k}
    a = fam.trl_sigmoid(**{k: v for k, v in batch.items() if "sum_sq" not in k}, beta=0.5, ld_alpha=0.4)
    b = fam.trl_sigmoid(**policy, **ref_sums, beta=0.5, ld_alpha=0.4)
    torch.testing.assert_close(a.losses, b.losses)
    torch.testing.assert_close(a.chosen_rewards, b.chosen_rewards)


def test_mixture_is_weighted_sum(fam) -> None:
    p = _pairs(6)
    mix = fam.dpo_mixture(**p, beta=0.4, loss_types=["sigmoid", "bco_pair", "sft"], loss_weights=[0.8, 0.2, 1.0])
    parts = [fam.trl_sigmoid(**p, beta=0.4), fam.trl_bco_pair(**p, beta=0.4), fam.trl_sft(**p, beta=0.4)]
    torch.testing.assert_close(mix.losses, 0.8 * parts[0].losses + 0.2 * parts[1].losses + parts[2].losses)
    assert set(mix.metrics) == {"loss/sigmoid", "loss/bco_pair", "loss/sft"}


def test_gradients_reach_policy_only(fam) -> None:
    batch = make_batch(2)
    pw = batch["policy_chosen_token_logps"].clone().requires_grad_(True)
    rw = batch["reference_chosen_token_logps"].clone().requires_grad_(True)
    out = fam.dpo_mixture(
        **{**batch, "policy_chosen_token_logps": pw, "reference_chosen_token_logps": rw},
        beta=0.5,
        loss_types=["sigmoid", "sft", "ipo"],
        use_weighting=True,
        ld_alpha=0.5,
    )
    out.losses.sum().backward()
    assert pw.grad is not None and torch.isfinite(pw.grad).all() and rw.grad is None
    for extra in (out.chosen_rewards, out.rejected_rewards, out.logits, *out.metrics.values()):
        assert not extra.requires_grad
    p = {k: v.clone().requires_grad_(k.startswith("policy")) for k, v in _pairs(8).items()}
    for lt in LOSS_TYPES:
        kw = {"label_smoothing": 0.1} if lt in ("exo_pair", "robust", "aot", "aot_unpaired") else {}
        wrt = (p["policy_chosen_logps"], p["policy_rejected_logps"])

        def f(a, b, lt=lt, kw=kw):
            return getattr(fam, f"trl_{lt}")(
                **{**p, "policy_chosen_logps": a, "policy_rejected_logps": b}, beta=0.6, **kw
            ).losses

        assert torch.autograd.gradcheck(f, wrt, eps=1e-6, atol=1e-7), lt


def test_bad_inputs_raise_clear_errors(fam) -> None:
    p = _pairs()
    batch = make_batch()
    with pytest.raises(ValueError, match=r"`policy_chosen_token_logps` must be a floating tensor of shape \(B, T\)"):
        fam.trl_sigmoid(**{**batch, "policy_chosen_token_logps": batch["policy_chosen_token_logps"][0]}, beta=1.0)
    with pytest.raises(ValueError, match="`rejected_mask` must have the shape"):
        fam.trl_sigmoid(**{**batch, "rejected_mask": batch["rejected_mask"][:, :3]}, beta=1.0)
    with pytest.raises(ValueError, match="needs `chosen_mask`"):
        fam.trl_sigmoid(**{**batch, "chosen_mask": None}, beta=1.0)
    with pytest.raises(ValueError, match="need per-token inputs"):
        fam.trl_sigmoid(**p, beta=1.0, ld_alpha=0.5)
    with pytest.raises(ValueError, match="need per-token inputs"):
        fam.trl_sigmoid(**p, beta=1.0, use_weighting=True)
    with pytest.raises(ValueError, match="needs `chosen_log_sum_sq_probs`"):
        fam.trl_sigmoid(**{k: v for k, v in batch.items() if "sum_sq" not in k}, beta=1.0, use_weighting=True)
    with pytest.raises(ValueError, match="not both"):
        fam.trl_sigmoid(**batch, policy_chosen_logps=p["policy_chosen_logps"][:4], beta=1.0)
    with pytest.raises(ValueError, match="exo_pair needs 0 < label_smoothing"):
        fam.trl_exo_pair(**p, beta=1.0, label_smoothing=0.0)
    with pytest.raises(ValueError, match="robust needs label_smoothing"):
        fam.trl_robust(**p, beta=1.0, label_smoothing=0.5)
    with pytest.raises(ValueError, match="`ld_alpha` must be in"):
        fam.trl_sigmoid(**batch, beta=1.0, ld_alpha=1.5)
    with pytest.raises(ValueError, match="only supported for"):
        fam.dpo_mixture(**p, beta=1.0, loss_types=["sigmoid", "bco_pair"], f_divergence_type="js_divergence")
    with pytest.raises(TypeError, match="f_divergence_type"):
        fam.trl_bco_pair(**p, beta=1.0, f_divergence_type="js_divergence")
    with pytest.raises(ValueError, match="not defined for aot"):
        fam.dpo_mixture(**batch, beta=1.0, loss_types=["aot", "sigmoid"], use_weighting=True)
    with pytest.raises(ValueError, match="must match"):
        fam.dpo_mixture(**p, beta=1.0, loss_types=["sigmoid", "sft"], loss_weights=[1.0])
    with pytest.raises(ValueError, match="loss_types must be"):
        fam.dpo_mixture(**p, beta=1.0, loss_types=["sigmoid", "dpo"])
    with pytest.raises(ValueError, match="`beta` must be a finite number > 0"):
        fam.trl_hinge(**p, beta=0.0)
    with pytest.raises(ValueError, match="both `chosen_lengths` and `rejected_lengths`"):
        fam.trl_ipo(**p, beta=1.0, chosen_lengths=torch.ones(5))
    with pytest.raises(TypeError):
        fam.trl_sigmoid(p["policy_chosen_logps"], beta=1.0)
    with pytest.raises(TypeError, match="unexpected keyword"):
        fam.trl_sigmoid(**p, beta=1.0, temperature=1.0)
