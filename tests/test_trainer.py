"""HydraLoRA under transformers.Trainer and TRL's SFTTrainer: training, the balance loss, router metrics, save/reload."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel, get_peft_model

import peft_hydra
from peft_hydra import HydraLoraConfig, prepare_trainer

from conftest import IdsDataset, word_tokenizer  # noqa: E402

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


def test_trainer_computes_the_balance_term_with_the_accumulated_batch_share(tiny_llama, tmp_path):
    """With gradient accumulation the Trainer passes num_items_in_batch (the accumulated batch's label tokens) and does
    not divide the loss: the balance term enters with this micro-batch's share of those tokens, as the LM loss."""
    from transformers import Trainer

    coef = 0.5
    model = get_peft_model(tiny_llama(), _config(router_aux_loss_coef=coef, init_weights=False)).train()
    trainer = Trainer(model=model, args=_args(tmp_path, gradient_accumulation_steps=2),
                      train_dataset=IdsDataset(_sequences()))  # fmt: skip
    prepare_trainer(trainer)
    with pytest.raises(ValueError, match="already called"):
        prepare_trainer(trainer)
    assert isinstance(trainer.callback_handler.callbacks[0], peft_hydra.HydraLoraCallback)  # first: loggers see it
    batch = {k: torch.stack([IdsDataset(_sequences(4))[i][k] for i in range(4)]) for k in ("input_ids", "labels")}
    num_items = torch.tensor(2 * 4 * 15)  # two micro-batches of 4 x 15 label tokens after the causal shift
    loss = trainer.compute_loss(model, batch, num_items_in_batch=num_items)
    balance = model.base_model.hydra_aux_loss() / coef
    logits = model(**batch).logits
    lm = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten(), reduction="sum")
    torch.testing.assert_close(loss, lm / num_items + coef * balance / 2)
    # Without num_items_in_batch the Trainer divides the whole loss by the accumulation steps itself
    loss = trainer.compute_loss(model, batch)
    torch.testing.assert_close(loss, lm / (4 * 15) + coef * balance)


# --------------------------------------------------------- the balance loss in every loop, without any helper
COEF = 0.5


def _fresh(tiny_llama, coef, **kw):
    torch.manual_seed(0)
    return get_peft_model(tiny_llama(), _config(router_aux_loss_coef=coef, init_weights=False, **kw)).train()


def _router_rows(model):
    return [m.hydra_A["default"].weight[4:].detach().clone() for m in model.modules()
            if isinstance(m, peft_hydra.HydraLoraLayer)]  # fmt: skip


def _balance_gradient(tiny_llama, batch):
    """d(balance loss)/d(router rows) at the initial weights, on ``batch``."""
    model = _fresh(tiny_llama, COEF)
    model(**batch)
    rows = [m.hydra_A["default"].weight for m in model.modules() if isinstance(m, peft_hydra.HydraLoraLayer)]
    return [g[4:] / COEF for g in torch.autograd.grad(model.base_model.hydra_aux_loss(), rows)]


def _assert_balance_step(tiny_llama, run, lr=1.0):
    """One plain SGD step (``run(model)`` returns the batch it trained on) with and without the balance loss: the
    router rows differ by exactly -lr * coef * d(balance)/dW, so the loop trained on the model's own loss, with
    the balance term in it once."""
    start = _router_rows(_fresh(tiny_llama, COEF))
    after = {}
    for coef in (COEF, 0.0):
        model = _fresh(tiny_llama, coef)
        batch = run(model)
        after[coef] = _router_rows(model)
    grads = _balance_gradient(tiny_llama, {k: v for k, v in batch.items() if k in ("input_ids", "labels")})
    assert any(g.abs().max() > 1e-4 for g in grads)
    for w_on, w_off, w0, g in zip(after[COEF], after[0.0], start, grads):
        assert not torch.equal(w_off, w0)  # the step happened
        torch.testing.assert_close(w_on - w_off, -lr * COEF * g, rtol=1e-3, atol=1e-6)


def _sgd_args(tmp_path, **kw):
    return dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=8, max_steps=1, learning_rate=1.0,
                optim="sgd", max_grad_norm=0.0, lr_scheduler_type="constant", logging_steps=1, save_strategy="no",
                report_to=[], use_cpu=True, seed=0, dataloader_num_workers=0, disable_tqdm=True, **kw)  # fmt: skip


def test_balance_loss_trains_in_a_plain_trainer(tiny_llama, tmp_path):
    from transformers import Trainer, TrainingArguments

    def run(model):
        trainer = Trainer(model=model, args=TrainingArguments(**_sgd_args(tmp_path)),
                          train_dataset=IdsDataset(_sequences(8)))  # fmt: skip
        batch = next(iter(trainer.get_train_dataloader()))
        trainer.train()
        return batch

    _assert_balance_step(tiny_llama, run)


def test_balance_loss_trains_in_trl_sft_trainer(tiny_llama, tmp_path):
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    texts = [" ".join(f"w{int(t)}" for t in row) for row in 4 + (_sequences(8) - 3) % (VOCAB - 4)]  # no <unk>

    def run(model):
        args = SFTConfig(**_sgd_args(tmp_path, max_length=24, bf16=False))
        trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_dict({"text": texts}),
                             processing_class=word_tokenizer())  # fmt: skip
        batch = next(iter(trainer.get_train_dataloader()))
        assert (batch["labels"] != -100).all()  # no padding: the reference forward sees the same tokens
        trainer.train()
        return batch

    _assert_balance_step(tiny_llama, run)


def test_balance_loss_trains_in_an_accelerate_loop(tiny_llama):
    from accelerate import Accelerator

    def run(model):
        accelerator = Accelerator(cpu=True)
        loader = torch.utils.data.DataLoader(IdsDataset(_sequences(8)), batch_size=8)
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
        model, opt, loader = accelerator.prepare(model, opt, loader)
        batch = next(iter(loader))
        accelerator.backward(model(**batch).loss)
        opt.step()
        return batch

    _assert_balance_step(tiny_llama, run)


def test_balance_loss_trains_in_a_plain_loop(tiny_llama):
    def run(model):
        batch = next(iter(torch.utils.data.DataLoader(IdsDataset(_sequences(8)), batch_size=8)))
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
        model(**batch).loss.backward()
        opt.step()
        return batch

    _assert_balance_step(tiny_llama, run)


def test_callback_passed_to_the_trainer_logs_router_metrics(tiny_llama, tmp_path):
    from transformers import Trainer

    model = get_peft_model(tiny_llama(), _config(router_aux_loss_coef=0.01))
    trainer = Trainer(model=model, args=_args(tmp_path, max_steps=3), train_dataset=IdsDataset(_sequences()),
                      callbacks=[peft_hydra.HydraLoraCallback()])  # fmt: skip
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 3 and all("router_gate_0" in h and "router_aux_loss" in h for h in logs)
    assert type(trainer).compute_loss is Trainer.compute_loss and "compute_loss" not in vars(trainer)  # nothing patched
    assert "log" not in vars(trainer)


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
    trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=word_tokenizer())
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
