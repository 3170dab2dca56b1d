"""Offline preference training of causal LMs (``train.method: preference``) on the shared trainer base.

Any registered loss trains here; its registry kind picks the data layout (:mod:`diffalign.data.llm`): ``paired``
losses read ``prompt, chosen, rejected``, ``listwise`` ones ``prompt, responses, scores`` and ``unpaired`` ones
``prompt, completion, label``. One forward over all completions of a micro-batch gives per-token log-probs; the loss
gets exactly the inputs its signature names:

* TRL-style losses (``trl_*``, ``dpo_mixture``) per-token log-probs and masks (so LD-DPO and WPO work), the others
  summed log-likelihoods and, where they take them, completion lengths;
* listwise losses ``(B, n)`` lists (PRO) or the best response against ``(B, n−1)`` negatives (DMPO, DynamicPO);
* KTO its log-ratios, labels and a reference point ``z₀ = max(0, mean r)`` averaged over every process's batch
  (Diffusion-KTO's estimate; TRL's KTOTrainer estimates z from mismatched prompt/completion pairs instead);
* any other tensor a loss requires (``preference_probs`` for iREPO, ``reward_margins`` for MADPO) from the data
  column of that name. An optional ``weight`` column weights each example's loss.

The reference (``train.reference``, :mod:`diffalign.trainers.reference`): LoRA → the same model with its adapters
disabled; full fine-tune → a frozen copy (``frozen_copy_offload``: kept in CPU memory); ``precomputed`` → one
no-grad pass over the data before training (TRL's ``precompute_ref_log_probs``) that every process shares out
(:meth:`LLMPreferenceTrainer.reference_pass`), stored in ``<output_dir>/reference_logps/<key>.safetensors`` and
reused on resume, so training holds one network. Every mode gives the loss the same values, each example's summed
completion log-likelihoods, LD-adjusted when the loss uses ``ld_alpha`` (``_reference_forward``; the pass stores
exactly what that forward returns). Logged with TRL's names: ``rewards/chosen|rejected|accuracies|margins``,
``logps/chosen|rejected`` (summed), ``logits/chosen|rejected``, ``mean_token_accuracy``, ``kl`` (KTO), plus the
loss's own metrics. The final model is written with ``save_pretrained`` (a peft adapter folder under LoRA).
"""

from __future__ import annotations

import inspect
import json
import logging
import os
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from diffalign.config import Config
from diffalign.data.llm import LAYOUT_OF_KIND, TextCollator, TextPreferenceDataset, load_text_rows
from diffalign.losses import get_loss
from diffalign.losses.dpo_family import TENSOR_INPUTS, ld_adjusted_logps
from diffalign.models.causal_lm import TokenStats, completion_token_stats, sequence_logps
from diffalign.trainers.base import TrainResult
from diffalign.trainers.batching import EpochBatches
from diffalign.trainers.llm_policy import CausalLMTrainer
from diffalign.trainers.reference import PrecomputedReference
from diffalign.trainers.reference_store import ProcessGroup, reference_key, weights_fingerprint

logger = logging.getLogger(__name__)

# Tensor inputs the trainer builds itself; any other required tensor argument of a loss comes from the data.
_BUILT_INPUTS = frozenset(TENSOR_INPUTS) | {
    "policy_logps",
    "reference_logps",
    "lengths",
    "rewards",
    "labels",
    "reference_point",
    "chosen_nll",
}


def loss_data_columns(fn: Any) -> tuple[str, ...]:
    """Required tensor arguments of a loss that the trainer cannot build, i.e. data columns (e.g. iREPO's
    ``preference_probs``)."""
    return tuple(
        name
        for name, p in inspect.signature(fn).parameters.items()
        if p.default is inspect.Parameter.empty and "Tensor" in str(p.annotation) and name not in _BUILT_INPUTS
    )


def per_example(values: torch.Tensor, size: int) -> torch.Tensor:
    """(n·B, ...) values of a collated batch (completion-major rows) as (B, n, ...): one row per example."""
    return values.view(-1, size, *values.shape[1:]).transpose(0, 1)


class LLMPreferenceTrainer(CausalLMTrainer):
    def build(self) -> None:
        dc, lc = self.config.data, self.config.loss
        self.loss_fn = get_loss(lc.name)
        self.layout = LAYOUT_OF_KIND[self.loss_fn.kind]
        accepted = inspect.signature(self.loss_fn).parameters
        self.accepted = set(accepted)
        self.loss_params = {k: v for k, v in {"beta": lc.beta, **lc.params}.items() if k in accepted}
        self.token_inputs = "policy_chosen_token_logps" in accepted
        self.data_columns = loss_data_columns(self.loss_fn)
        self.build_policy(bool(getattr(self.loss_fn, "needs_reference", False)))
        tokenizer = self.tokenizer

        rows = load_text_rows(
            dc.path,
            self.layout,
            split=dc.split,
            extra_columns=self.data_columns,
            on_bad_row=dc.on_bad_row,
            max_samples=dc.max_samples,
        )
        self.dataset = TextPreferenceDataset(rows, tokenizer, self.layout, extra_columns=self.data_columns)
        self.collate = TextCollator(tokenizer.pad_token_id, dc.max_length, self.data_columns)

    def after_prepare(self) -> None:
        if isinstance(self.reference, PrecomputedReference):
            self._fill_reference_values()  # here: before a checkpoint is restored, the weights are the initial ones

    # -- one micro-batch ----------------------------------------------------------------------------------------
    def _forward(self, model: torch.nn.Module, batch: dict[str, torch.Tensor], *, policy: bool) -> TokenStats:
        """Token statistics of every completion; the reference (``policy=False``) needs only its log-probs."""
        device = self.accelerator.device
        ids, attention, completion = (batch[k].to(device) for k in ("input_ids", "attention_mask", "completion_mask"))
        with_sum_sq = policy and bool(self.loss_params.get("use_weighting", False))
        return completion_token_stats(model, ids, attention, completion, with_sum_sq=with_sum_sq, with_details=policy)

    def _reference_forward(self, batch: dict[str, torch.Tensor]) -> Callable[[torch.nn.Module], torch.Tensor]:
        """How the reference network evaluates a batch: (B, n) float32 summed completion log-likelihoods per
        example, LD-adjusted when the loss uses ``ld_alpha`` (what a summed reference must hold, TRL's convention)."""
        size = batch["index"].numel()
        ld_alpha = self.loss_params.get("ld_alpha")

        def forward(module: torch.nn.Module) -> torch.Tensor:
            with self.accelerator.autocast():  # as the prepared policy runs, whichever network this is
                stats = self._forward(module, batch, policy=False)
            if self.layout == "pairs" and ld_alpha is not None:
                chosen, rejected = ld_adjusted_logps(
                    stats.logps[:size], stats.mask[:size], stats.logps[size:], stats.mask[size:], ld_alpha
                )
                return torch.stack([chosen, rejected], dim=1)
            return per_example(sequence_logps(stats.logps, stats.mask), size)

        return forward

    def compute_loss(self, batch: dict[str, Any], epoch: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        device = self.accelerator.device
        stats = self._forward(self.model, batch, policy=True)
        size = batch["index"].numel()
        sums = per_example(sequence_logps(stats.logps, stats.mask), size)  # (B, n)
        reference = None
        if self.reference is not None:
            reference = self.reference.logps(batch, epoch, self._reference_forward(batch)).to(device)  # (B, n)
        kwargs = self._loss_inputs(stats, sums, reference, batch, size)
        out = self.loss_fn(**kwargs, **self.loss_params)
        weight = batch["weight"].to(device)
        loss = (out.losses * weight).mean()
        return loss, self._metrics(out, stats, sums.detach(), batch, size)

    def _loss_inputs(
        self,
        stats: TokenStats,
        sums: torch.Tensor,
        ref_sums: torch.Tensor | None,
        batch: dict[str, Any],
        size: int,
    ) -> dict[str, Any]:
        device = self.accelerator.device
        lengths = per_example(stats.mask.sum(-1).float(), size)
        kw: dict[str, Any] = {}
        if self.layout == "pairs" and self.token_inputs:
            kw["policy_chosen_token_logps"], kw["policy_rejected_token_logps"] = stats.logps[:size], stats.logps[size:]
            kw["chosen_mask"], kw["rejected_mask"] = stats.mask[:size], stats.mask[size:]
            if ref_sums is not None:
                kw["reference_chosen_logps"], kw["reference_rejected_logps"] = ref_sums[:, 0], ref_sums[:, 1]
            if stats.log_sum_sq_probs is not None:
                kw["chosen_log_sum_sq_probs"] = stats.log_sum_sq_probs[:size]
                kw["rejected_log_sum_sq_probs"] = stats.log_sum_sq_probs[size:]
        elif self.layout == "pairs":
            kw["policy_chosen_logps"], kw["policy_rejected_logps"] = sums[:, 0], sums[:, 1]
            kw["chosen_lengths"], kw["rejected_lengths"] = lengths[:, 0], lengths[:, 1]
            if ref_sums is not None:
                kw["reference_chosen_logps"], kw["reference_rejected_logps"] = ref_sums[:, 0], ref_sums[:, 1]
        elif self.layout == "rankings":
            if "policy_logps" in self.accepted:  # PRO: the whole ranked list
                kw.update(policy_logps=sums, lengths=lengths, rewards=batch["scores"].to(device))
            else:  # DMPO / DynamicPO: the best response against the others
                kw.update(policy_chosen_logps=sums[:, 0], policy_rejected_logps=sums[:, 1:])
                if ref_sums is not None:
                    kw.update(reference_chosen_logps=ref_sums[:, 0], reference_rejected_logps=ref_sums[:, 1:])
        else:  # unpaired
            kw.update(policy_logps=sums[:, 0], labels=batch["label"].to(device).float())
            if ref_sums is not None:
                kw["reference_logps"] = ref_sums[:, 0]
                if "reference_point" in self.accepted:
                    kw["reference_point"] = self._global_mean((sums[:, 0] - ref_sums[:, 0]).detach())
        for key in self.data_columns:
            kw[key] = batch[key].to(device)
        return {k: v for k, v in kw.items() if k in self.accepted}

    def _global_mean(self, values: torch.Tensor) -> torch.Tensor:
        total = self.accelerator.reduce(torch.stack([values.sum(), values.new_tensor(float(values.numel()))]), "sum")
        return (total[0] / total[1]).clamp(min=0.0)

    def _metrics(
        self, out: Any, stats: TokenStats, sums: torch.Tensor, batch: dict[str, Any], size: int
    ) -> dict[str, torch.Tensor]:
        mean_logits = per_example(stats.mean_logits, size)
        m: dict[str, torch.Tensor] = {}
        chosen, rejected = out.chosen_rewards, out.rejected_rewards
        if self.layout == "unpaired":
            label = batch["label"].to(chosen.device)
            nan = torch.full_like(chosen, float("nan"))
            m["rewards/chosen"] = torch.where(label, chosen, nan)
            m["rewards/rejected"] = torch.where(label, nan, chosen)
            m["logps/chosen"] = torch.where(label, sums[:, 0], nan)
            m["logps/rejected"] = torch.where(label, nan, sums[:, 0])
        else:
            if chosen is not None and rejected is not None:
                m["rewards/chosen"], m["rewards/rejected"] = chosen, rejected
                m["rewards/accuracies"] = (chosen > rejected).float()
                m["rewards/margins"] = chosen - rejected
            m["logps/chosen"], m["logps/rejected"] = sums[:, 0], sums[:, 1:].mean(-1)
            m["logits/chosen"], m["logits/rejected"] = mean_logits[:, 0], mean_logits[:, 1:].mean(-1)
        chosen_mask = stats.mask[:size]
        m["mean_token_accuracy"] = (stats.top1_correct[:size].sum() / chosen_mask.sum().clamp(min=1)).reshape(1)
        for name, value in out.metrics.items():
            m[name] = value.detach()
        return m

    # -- precomputed reference ----------------------------------------------------------------------------------
    def _reference_file(self) -> Path:
        mc, dc = self.config.model, self.config.data
        parts = {
            "kind": "causal_lm",
            "weights": weights_fingerprint(mc.pretrained, mc.revision),
            "dtype": mc.torch_dtype,
            "data": self.dataset.fingerprint,
            "max_length": dc.max_length,
            "tokenizer": type(self.tokenizer).__name__,
            "ld_alpha": self.loss_params.get("ld_alpha"),
            "lora": [self.config.lora.init, self.config.lora.rank] if self.config.lora.enabled else None,
            "mixed_precision": self.accelerator.mixed_precision,
        }
        return self.output_dir / "reference_logps" / f"{reference_key(parts)}.safetensors"

    def _fill_reference_values(self) -> None:
        """``train.reference=precomputed``: the (N, n) reference values of every example, from the file of this
        key, or computed now by every process's share of :meth:`reference_pass` and written by the main process."""
        path, acc = self._reference_file(), self.accelerator
        stored = path.is_file()  # every process looks before anyone writes, so all agree on computing
        acc.wait_for_everyone()
        if not stored:
            values = self.reference_pass(ProcessGroup.of(acc))
            if acc.is_main_process:
                _write_reference_values(path, values, self.config.data.path)
            acc.wait_for_everyone()
        values = load_file(str(path))["reference"]
        if values.shape[0] != len(self.dataset):
            raise RuntimeError(
                f"{path}: holds {values.shape[0]} examples, the data has {len(self.dataset)}; delete it to recompute"
            )
        self.reference.load(lambda batch, epoch: values[batch["index"]], str(path))

    def reference_pass(self, processes: ProcessGroup) -> torch.Tensor:
        """The (N, n) reference values of every example, float32, from the initial weights (on every process).

        The batches are epoch 0's training order cut into chunks of ``train.train_batch_size``: wherever epoch 0
        draws an example, its chunk is exactly its training batch (the same padding, so the same rounding as a live
        frozen copy), on any number of processes. Chunk ``c`` is computed by process ``c mod P``; every process runs
        the same number of forwards (the final chunk is repeated where the chunks do not divide evenly: with sharded
        weights each forward is a collective).
        """
        tc, n = self.config.train, len(self.dataset)
        order = EpochBatches(n, tc.train_batch_size, seed=tc.seed).order(0)
        chunks = [order[start : start + tc.train_batch_size] for start in range(0, n, tc.train_batch_size)]
        rounds = -(-len(chunks) // processes.count)
        mine = [chunks[min(r * processes.count + processes.index, len(chunks) - 1)] for r in range(rounds)]
        show = tc.progress_bar and self.accelerator.is_local_main_process
        computed = []
        for indices in tqdm(mine, desc="reference log-probs", disable=not show):
            batch = self.collate([self.dataset[i] for i in indices])
            computed.append((indices, self.reference.compute(self._reference_forward(batch)).float().cpu()))
        everything = [item for share in processes.gather(computed) for item in share]
        values = torch.zeros(n, everything[0][1].shape[1])
        for indices, chunk in everything:
            values[indices] = chunk
        return values


def _write_reference_values(path: Path, values: torch.Tensor, data: str) -> None:
    """``values`` as ``{"reference": (N, n)}`` at ``path``, atomically, with a note of the data beside it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    save_file({"reference": values.contiguous()}, str(tmp), metadata={"examples": str(values.shape[0])})
    os.replace(tmp, path)
    path.with_suffix(".json").write_text(json.dumps({"data": data}) + "\n")


def train(config: Config) -> TrainResult:
    """Run the causal-LM preference trainer described by ``config``."""
    return LLMPreferenceTrainer(config).train()
