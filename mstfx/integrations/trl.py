"""TRL: ``SFTTrainer`` with the loss computed inside the compiled model, where mst chunks the LM head.

    import mstfx
    from mstfx.integrations.trl import MstSFTTrainer

    mstfx.compile(model)                               # MLPs (and attention) as with any trainer
    trainer = MstSFTTrainer(model=model, args=SFTConfig(...), train_dataset=ds, processing_class=tok)
    trainer.train()                                    # LM head + loss chunked too

Why a subclass: ``SFTTrainer.compute_loss`` computes the loss from per-token log-probabilities that
its own fused LM head returns (``add_fused_lm_head``; earlier TRL versions: from the returned logits).
Either way the LM head and the loss run outside what mst can rewrite (TRL's kernel breaks the Dynamo
graph), so only the MLPs and the attention were chunked.  :class:`MstSFTTrainer` instead calls the
model with the labels and ``num_items_in_batch`` and reads the model's own ``.loss``, the Hugging Face
causal-LM loss (the same value: summed negative log-likelihood over the non-ignored next tokens,
divided by ``num_items_in_batch`` or by their count).  The model is wrapped by
:func:`mstfx.drop_logits`, so the logits are dead code in the compiled graph and mst rewrites the LM
head + cross-entropy into its chunked loss.

What is not logged: TRL's ``entropy`` and ``mean_token_accuracy`` metrics, which need every token's
full distribution; computing them would bring back the tokens×vocab logits.  ``num_tokens`` is kept.

Configurations whose loss is not the plain next-token NLL (``loss_type="dft"``, label smoothing,
``compute_loss_func``, a MoE auxiliary loss, DeepSpeed sequence parallelism) keep TRL's own loss; a
warning names the reason.  Evaluation that asks for the logits (``compute_metrics``) also goes through
TRL, which recomputes them without labels.
"""

from __future__ import annotations

import logging
import warnings

import torch
from trl import SFTTrainer

from ..wrappers import drop_logits

log = logging.getLogger("mstfx")

__all__ = ["MstSFTTrainer", "trl_loss_fallback_reason"]


def trl_loss_fallback_reason(trainer) -> str | None:
    """Why ``trainer`` (an ``SFTTrainer``) needs TRL's own loss, or None when the model's loss is the same."""
    args = trainer.args
    if getattr(args, "loss_type", "nll") != "nll":
        return f"loss_type={args.loss_type!r} weights each token's loss by its probability"
    if getattr(trainer, "compute_loss_func", None) is not None:
        return "a compute_loss_func computes the loss from the full logits"
    if getattr(trainer, "label_smoother", None) is not None:
        return "label smoothing needs the full logits"
    if getattr(trainer, "aux_loss_enabled", False):
        return "TRL scales the MoE auxiliary loss by the gradient accumulation steps"
    pc = getattr(trainer.accelerator, "parallelism_config", None)
    if pc is not None and getattr(pc, "sp_enabled", False) and getattr(pc, "sp_backend", None) == "deepspeed":
        return "DeepSpeed sequence parallelism reduces the loss across ranks"
    return None


class MstSFTTrainer(SFTTrainer):
    """``trl.SFTTrainer`` whose training loss is the model's own (labels passed in), computed inside the
    compiled model where the mst backend chunks the LM head + cross-entropy.

    Takes exactly ``SFTTrainer``'s arguments.  Compile the model with the mst backend first
    (``mstfx.compile(model)``, which also traces TRL's default gradient checkpointing whole); the trainer wraps it with :func:`mstfx.drop_logits` (undo with
    ``mstfx.wrappers.keep_logits``).  ``entropy`` and ``mean_token_accuracy`` are not logged.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.mst_fallback_reason = trl_loss_fallback_reason(self)
        if self.mst_fallback_reason is not None:
            warnings.warn(
                f"MstSFTTrainer: {self.mst_fallback_reason}, so TRL computes the loss with its own fused LM head; "
                "mst chunks the MLPs but not the LM head.",
                UserWarning,
                stacklevel=2,
            )
            return
        drop_logits(self.model)
        if getattr(self.model, "_compiled_call_impl", None) is None:
            log.warning("MstSFTTrainer: the model is not compiled (yet); compile it with "
                        "mstfx.compile(model) before training, or nothing is chunked")
        log.info("MstSFTTrainer: the loss is computed in the compiled model (LM head + loss chunked by mst); "
                 "entropy and mean_token_accuracy are not logged (they need the full logits)")

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self.mst_fallback_reason is not None or return_outputs:
            return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)
        mode = "train" if self.model.training else "eval"
        inputs["use_cache"] = False
        extra = {} if num_items_in_batch is None else {"num_items_in_batch": num_items_in_batch}
        loss = model(**inputs, **extra).loss
        # As SFTTrainer: `num_items_in_batch` counts every rank's tokens and DDP averages the gradients
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            loss = loss * (self.accelerator.num_processes // self.get_tp_size())
        if mode == "train":
            self._count_tokens(inputs)
        self._metrics[mode]["num_tokens"] = [getattr(self, "_total_train_tokens", 0)]
        return loss

    def _count_tokens(self, inputs) -> None:
        """SFTTrainer's ``num_tokens`` bookkeeping (padding-free batches carry position_ids, no mask)."""
        if "attention_mask" in inputs:
            local = inputs["attention_mask"].sum()
        elif "position_ids" in inputs:
            local = torch.tensor(inputs["position_ids"].size(1), device=inputs["position_ids"].device)
        else:
            raise ValueError("Expected 'attention_mask' or 'position_ids' in inputs.")
        tokens = self.accelerator.gather_for_metrics(local).sum().item() // getattr(self, "_tp_size", 1)
        self._total_train_tokens = getattr(self, "_total_train_tokens", 0) + tokens
