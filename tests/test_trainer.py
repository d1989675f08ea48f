"""HydraLoRA under transformers.Trainer and TRL's SFTTrainer: training, the balance loss, router metrics, save/reload."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel, get_peft_model

import peft_hydra
from peft_hydra import HydraLoraConfig, prepare_trainer

from conftest import IdsDataset  # noqa: E402
from peft_hydra.functional import load_balancing_loss

from conftest import VOCAB  # noqa: E402  (tests/ is on sys.path under pytest's rootdir conftest)

TARGETS = ["q_proj", "v_proj", "up_proj", "down_proj"]


def _config(**overrides):
    kwargs = dict(r=4, lora_alpha=8, num_experts=3, target_modules=TARGETS, task_type="CAUSAL_LM")
    kwargs.update(overrides)
    return HydraLoraConfig(**kwargs)


def _sequences(n=32, length=16, seed=0):
    """Learnable data: arithmetic progressions of token ids (the next token is predictable)."""
    g = torch.Generator().manual_seed(seed)
    start = torch.randint(3, VOCAB, (n, 1), generator=g)
    step = torch.randint(1, 4, (n, 1), generator=g)
    return ((start - 3 + step * torch.arange(length)) % (VOCAB - 3)) + 3


def _args(tmp_path, **overrides):
    from transformers import TrainingArguments

    kwargs = dict(
        output_dir=str(tmp_path / "out"), per_device_train_batch_size=8, max_steps=40, learning_rate=5e-2,
        logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, seed=0, dataloader_num_workers=0,
        disable_tqdm=True, lr_scheduler_type="constant",
    )  # fmt: skip
    kwargs.update(overrides)
    return TrainingArguments(**kwargs)


def _assert_went_down(losses):
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < first - 0.1, (first, last, losses)  # step-to-step noise here is ~0.03


def _train_losses(trainer):
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


def test_trainer_trains_logs_router_metrics_and_reloads(tiny_llama, tmp_path):
    from transformers import Trainer

    model = get_peft_model(tiny_llama(), _config(router_aux_loss_coef=0.01))
    trainer = Trainer(model=model, args=_args(tmp_path), train_dataset=IdsDataset(_sequences()),
                      eval_dataset=IdsDataset(_sequences(8, seed=1)))  # fmt: skip
    prepare_trainer(trainer)  # the one documented line
    trainer.train()

    losses = _train_losses(trainer)
    assert len(losses) == 40
    _assert_went_down(losses)

    logs = [h for h in trainer.state.log_history if "loss" in h]
    for h in logs:
        gates = [h[f"router_gate_{i}"] for i in range(3)]
        assert abs(sum(gates) - 1) < 1e-4 and all(g > 0 for g in gates)
        assert 0 < h["router_entropy"] <= torch.log(torch.tensor(3.0)).item() + 1e-6
        assert h["router_aux_loss"] >= 0.01 * 1.0 - 1e-6  # coef x balance loss, and balance loss >= 1
    metrics = trainer.evaluate()
    assert abs(sum(metrics[f"eval_router_gate_{i}"] for i in range(3)) - 1) < 1e-4
    assert "eval_router_entropy" in metrics and "eval_router_aux_loss" not in metrics

    trainer.save_model(str(tmp_path / "adapter"))
    reloaded = PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "adapter")).eval()
    model.eval()
    ids = _sequences(2, seed=3)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, model(ids).logits)
        assert (model(ids).logits - tiny_llama()(ids).logits).abs().max() > 1e-3  # training changed the model


def test_trainer_without_prepare_trains_unchanged(tiny_llama, tmp_path):
    """No helper needed to train: a plain Trainer reduces the loss (the helper only adds the balance loss/metrics)."""
    from transformers import Trainer

    model = get_peft_model(tiny_llama(), _config(top_k=1))
    trainer = Trainer(model=model, args=_args(tmp_path, max_steps=40), train_dataset=IdsDataset(_sequences()))
    trainer.train()
    losses = _train_losses(trainer)
    _assert_went_down(losses)
    assert "router_entropy" not in trainer.state.log_history[0]


@pytest.mark.parametrize("grad_accum", [1, 2])
def test_compute_loss_adds_coef_times_balance_loss(tiny_llama, tmp_path, grad_accum):
    from transformers import Trainer

    coef = 0.5
    model = get_peft_model(tiny_llama(), _config(router_aux_loss_coef=coef, init_weights=False))
    trainer = Trainer(model=model, args=_args(tmp_path, gradient_accumulation_steps=grad_accum),
                      train_dataset=IdsDataset(_sequences()))  # fmt: skip
    prepare_trainer(trainer)
    with pytest.raises(ValueError, match="already called"):
        prepare_trainer(trainer)
    model.train()
    batch = {k: torch.stack([IdsDataset(_sequences(4))[i][k] for i in range(4)]) for k in ("input_ids", "labels")}
    trainer.current_gradient_accumulation_steps = grad_accum
    num_items = torch.tensor(4 * 15)  # label tokens after the causal shift; makes the Trainer skip its GA division
    loss = trainer.compute_loss(model, batch, num_items_in_batch=num_items)

    task = model(**batch, num_items_in_batch=num_items).loss
    layers = [m for m in model.modules() if isinstance(m, peft_hydra.HydraLoraLayer)]
    balance = torch.stack([load_balancing_loss(*m._router_out["default"]) for m in layers]).mean()
    torch.testing.assert_close(loss, task + coef * balance / grad_accum)

    # Without num_items_in_batch the Trainer divides the whole loss by the GA steps itself: no extra division here.
    loss = trainer.compute_loss(model, batch)
    torch.testing.assert_close(loss, model(**batch).loss + coef * balance)


def _char_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, **{f"w{i}": i for i in range(4, VOCAB)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


def test_trl_sft_trainer(tiny_llama, tmp_path):
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    texts = [" ".join(f"w{int(t)}" for t in row if t >= 4) for row in _sequences(32)]
    dataset = Dataset.from_dict({"text": texts})
    model = get_peft_model(tiny_llama(), _config(router_aux_loss_coef=0.01, top_k=2))
    args = SFTConfig(
        output_dir=str(tmp_path / "sft"), per_device_train_batch_size=8, max_steps=40, learning_rate=5e-2,
        logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, seed=0, max_length=24,
        disable_tqdm=True, lr_scheduler_type="constant", bf16=False,  # TRL defaults to bf16 autocast
    )  # fmt: skip
    trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=_char_tokenizer())
    prepare_trainer(trainer)
    trainer.train()
    losses = _train_losses(trainer)
    _assert_went_down(losses)
    assert all("router_gate_2" in h and "router_aux_loss" in h for h in trainer.state.log_history if "loss" in h)
    assert isinstance(trainer.model.base_model, peft_hydra.HydraLoraModel)

    trainer.save_model(str(tmp_path / "adapter"))
    reloaded = PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "adapter")).eval()
    ids = _sequences(2, seed=5)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, trainer.model.eval()(ids).logits)


def test_prepare_trainer_rejects_models_without_hydralora(tiny_llama, tmp_path):
    from transformers import Trainer

    trainer = Trainer(model=tiny_llama(), args=_args(tmp_path), train_dataset=IdsDataset(_sequences(4)))
    with pytest.raises(ValueError, match="holds no HydraLoRA adapter"):
        prepare_trainer(trainer)
    with pytest.raises(TypeError, match="expects a transformers.Trainer"):
        prepare_trainer(object())
