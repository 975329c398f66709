"""TRL's SFTTrainer through mstfx.integrations.trl: every MLP and the LM head + loss chunked, the same
loss curve as TRL's own training; and the report line when the logits leave the compiled graph."""

from __future__ import annotations

import copy

import pytest
import torch

pytest.importorskip("trl", reason="TRL is not installed (pip install trl)")
pytest.importorskip("datasets", reason="datasets is not installed (pip install datasets)")

import mstfx  # noqa: E402

VOCAB, SEQ, ROWS = 128, 32, 12


def _tokenizer():
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {f"t{i}": i for i in range(VOCAB)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="t0"))
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="t0", eos_token="t1", unk_token="t0")


def _model():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=SEQ,
                      use_cache=False, attn_implementation="sdpa", eos_token_id=1, pad_token_id=0)
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg)


def _dataset():
    from datasets import Dataset

    g = torch.Generator().manual_seed(0)
    start = torch.randint(2, VOCAB, (ROWS, 1), generator=g)
    ids = (start + torch.arange(SEQ)) % (VOCAB - 2) + 2  # learnable: each token is the previous plus one
    return Dataset.from_dict({"input_ids": ids.tolist()})


def _train(trainer_cls, model, tmp_path, **cfg):
    from trl import SFTConfig

    # SGD: Adam's first steps are about lr·sign(grad), which turns rounding differences in near-zero
    # gradients into whole steps; SGD keeps the curves comparable at float tolerance
    args = SFTConfig(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=4, optim="sgd",
                     learning_rate=0.5, warmup_steps=0,
                     report_to=[], save_strategy="no", use_cpu=True, logging_steps=1, disable_tqdm=True, seed=0,
                     data_seed=0, dataloader_num_workers=0, **{"gradient_checkpointing": False, **cfg})
    trainer = trainer_cls(model=model, args=args, train_dataset=_dataset(), processing_class=_tokenizer())
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    return trainer, [h["loss"] for h in logs], logs


def test_sft_trainer_chunks_mlps_and_lm_head_with_the_plain_loss_curve(tmp_path):
    from trl import SFTTrainer

    from mstfx.integrations.trl import MstSFTTrainer

    plain_model = _model()
    model = copy.deepcopy(plain_model)
    _, plain, _ = _train(SFTTrainer, plain_model, tmp_path / "plain")

    be = mstfx.backend(mini_sequences=4, compiler="aot_eager")
    model.compile(backend=be)
    trainer, losses, logs = _train(MstSFTTrainer, model, tmp_path / "mst")

    assert trainer.mst_fallback_reason is None
    text = "\n".join(str(r) for r in be.reports)
    chunked = sorted((d.kind, d.where) for r in be.reports for d in r.chunked)
    assert chunked == [("lm_head", "lm_head"), ("mlp", "model.layers.0.mlp"), ("mlp", "model.layers.1.mlp")], text
    assert all(d.chunks == 4 for r in be.reports for d in r.chunked), text
    assert not [d for r in be.reports for d in r.skipped if d.kind == "lm_head"], text
    assert len(losses) == 3 and losses[-1] < losses[0]
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(plain), rtol=1e-4, atol=1e-5)
    assert all("entropy" not in h and "mean_token_accuracy" not in h and h["num_tokens"] > 0 for h in logs)


def test_sft_trainer_with_gradient_checkpointing(tmp_path):
    """TRL's default: the MLPs are chunked inside the checkpointed layers, the LM head + loss outside."""
    from trl import SFTTrainer

    from mstfx.integrations.trl import MstSFTTrainer

    model = _model()
    _, plain, _ = _train(SFTTrainer, copy.deepcopy(model), tmp_path / "plain")
    mstfx.compile(model, mini_sequences=4, compiler="aot_eager")  # traces the checkpointed layers whole
    be = mstfx.compile_model.backend_of(model)
    _, losses, _ = _train(MstSFTTrainer, model, tmp_path / "mst", gradient_checkpointing=True)
    text = "\n".join(str(r) for r in be.reports)
    kinds = sorted(d.kind for r in be.reports for d in r.chunked)
    assert kinds == ["lm_head", "mlp", "mlp"], text
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(plain), rtol=1e-4, atol=1e-5)


def test_sft_trainer_options_that_need_trls_loss_fall_back_with_a_warning(tmp_path):
    from trl import SFTConfig

    from mstfx.integrations.trl import MstSFTTrainer

    args = SFTConfig(output_dir=str(tmp_path), max_steps=1, report_to=[], save_strategy="no", use_cpu=True,
                     loss_type="dft")
    with pytest.warns(UserWarning, match="loss_type='dft'"):
        trainer = MstSFTTrainer(model=_model(), args=args, train_dataset=_dataset(), processing_class=_tokenizer())
    assert "dft" in trainer.mst_fallback_reason


def test_report_says_when_the_logits_leave_the_graph():
    """A trainer that computes the loss from returned logits: the LM head cannot be chunked, and the
    report says so (only in training: returning logits for inference is not a lost saving)."""
    be = mstfx.backend(compiler="eager")
    model = torch.compile(_model(), backend=be)
    ids = torch.randint(0, VOCAB, (2, SEQ))
    logits = model(input_ids=ids).logits
    torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids.flatten()).backward()
    head = [d for d in be.reports[-1].decisions if d.kind == "lm_head"]
    assert [(d.where, d.action) for d in head] == [("lm_head", "skipped")], str(be.reports[-1])
    assert "not chunked: logits leave the compiled graph (loss computed outside" in str(be.reports[-1])
    with torch.no_grad():
        model(input_ids=ids[:, :16])
    assert not [d for d in be.reports[-1].decisions if d.kind == "lm_head"], str(be.reports[-1])
