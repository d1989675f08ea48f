"""`HydraLoraConfig`: the PEFT config dataclass of HydraLoRA."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Sequence, Union

import torch
from peft.config import PeftConfig
from peft.utils import PeftType

#: The PEFT type added to ``peft.utils.PeftType`` on ``import peft_hydra`` (see ``_registry.py``).
PEFT_TYPE_NAME = "HYDRALORA"
#: The method name passed to ``peft.utils.register_peft_method``.
METHOD_NAME = "hydralora"
#: The prefix of every HydraLoRA tensor name: PEFT freezes every parameter whose name lacks it.
PREFIX = "hydra_"

#: Default ``target_modules`` for Llama-like decoders (Llama, Mistral, Qwen2/3, Gemma, SmolLM, ...): every linear
#: layer of attention and MLP. This is this package's default, NOT the HydraLoRA authors' choice: their training
#: scripts adapt the MLP only (gate_proj, up_proj, down_proj; see :meth:`HydraLoraConfig.paper_preset`). Used when
#: ``target_modules`` is None and the model's ``model_type`` is one of :data:`LLAMA_LIKE_MODEL_TYPES`; other models
#: fall back to PEFT's LoRA defaults.
LLAMA_LIKE_TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LLAMA_LIKE_MODEL_TYPES = (
    "llama", "mistral", "mixtral", "qwen2", "qwen3", "qwen2_moe", "gemma", "gemma2", "gemma3_text", "phi3",
    "olmo", "olmo2", "granite", "cohere", "starcoder2", "smollm3",
)  # fmt: skip

ROUTER_INPUTS = ("x", "a")
#: The values of ``HydraLoraConfig.router_scope``: gates per token, or per sequence from its first tokens.
ROUTER_SCOPES = ("token", "sequence")
#: The default of ``HydraLoraConfig.router_pool_tokens`` (K).
DEFAULT_POOL_TOKENS = 8
#: The initial scale exp(s0) of a cosine router's logits (``router_cosine=True``): a temperature of 0.1.
COSINE_INIT_SCALE = 10.0
#: The values of ``HydraLoraConfig.head_init`` (see its docstring and ``functional.init_heads``).
HEAD_INITS = ("zero", "centered", "orthogonal")


@dataclass
class HydraLoraConfig(PeftConfig):
    """Configuration of a HydraLoRA adapter (arXiv 2404.19245).

    Per targeted linear layer: one shared down-projection ``A`` (r x in), N heads ``B_i`` (out x r) and a router
    ``W_g`` (in -> N, no bias):

        y = W0 x + scaling * sum_i w_i(x) B_i A dropout(x),    w(x) = softmax(W_g x / router_temperature)

    with ``scaling = lora_alpha / r`` (``lora_alpha / sqrt(r)`` with ``use_rslora``); ``router_scope="sequence"`` takes
    x for the gates as the mean of the sequence's first ``router_pool_tokens`` real tokens. ``num_experts=1`` is exactly
    LoRA (no router). The LoRA fields mean what they mean in ``peft.LoraConfig``; every field's ``help`` says what it
    does, and docs/configuration.md gives the background of each HydraLoRA option. Every value is checked here, once:
    a wrong one raises a ValueError naming the field and the fix.
    """

    r: int = field(default=8, metadata={"help": "Rank of the shared A and of each B head."})
    lora_alpha: float = field(default=8, metadata={"help": "Scaling numerator: scaling = lora_alpha / r."})
    lora_dropout: float = field(default=0.0, metadata={"help": "Dropout probability on the adapter input, in [0, 1)."})
    num_experts: int = field(
        default=3,
        metadata={"help": "N, the number of B heads (1 = LoRA); peft_hydra.suggest_num_experts picks one from a corpus."},
    )
    target_modules: Optional[Union[list[str], str]] = field(
        default=None,
        metadata={"help": "Module names, suffixes, a regex or 'all-linear'. None: every linear of Llama-like models."},
    )
    exclude_modules: Optional[Union[list[str], str]] = field(
        default=None, metadata={"help": "Module names or a regex of modules not to adapt."}
    )
    layers_to_transform: Optional[Union[list[int], int]] = field(
        default=None, metadata={"help": "Only adapt these layer indices."}
    )
    layers_pattern: Optional[Union[list[str], str]] = field(
        default=None, metadata={"help": "Name of the layer list used with layers_to_transform, e.g. 'layers'."}
    )
    modules_to_save: Optional[list[str]] = field(
        default=None, metadata={"help": "Extra modules to train in full and save with the adapter."}
    )
    fan_in_fan_out: bool = field(default=False, metadata={"help": "True for (in, out) weights such as GPT-2 Conv1D."})
    use_rslora: bool = field(default=False, metadata={"help": "Use scaling = lora_alpha / sqrt(r)."})
    rank_pattern: dict = field(default_factory=dict, metadata={"help": "Per-module rank overrides {regex: r}."})
    alpha_pattern: dict = field(default_factory=dict, metadata={"help": "Per-module alpha overrides {regex: alpha}."})
    init_weights: bool = field(
        default=True, metadata={"help": "True: A Kaiming-uniform, B per head_init (identity start). False: B random."}
    )
    router_input: str = field(
        default="x", metadata={"help": "'x': router on the layer input (the authors' code); 'a': router on A x."}
    )
    top_k: Optional[int] = field(
        default=None,
        metadata={"help": "None: dense gates; k: keep the k largest per token, renormalised. k=1: the forward gate is "
                  "exactly 1 on the largest logit, 0 elsewhere (as before), and the router trains with the dense "
                  "softmax's gradient (straight through estimator; a renormalised top 1 gate alone has none)."},
    )
    router_temperature: float = field(default=1.0, metadata={"help": "Softmax temperature of the router (> 0)."})
    share_a: bool = field(default=True, metadata={"help": "False: one A per head (the paper's LoRA-split ablation)."})
    fixed_gates: Optional[Union[str, list[float], dict[str, list[float]]]] = field(
        default=None,
        metadata={"help": "None: learned router; 'uniform', N weights or {layer: N weights}: fixed gates, no router."},
    )
    router_scope: str = field(
        default="token",
        metadata={"help": "'token': gates per token (HydraLoRA). 'sequence': one gate vector per sequence, from the "
                  "router applied to the mean router input over the sequence's first router_pool_tokens real tokens "
                  "(causal: a token before that uses the mean of the tokens up to itself); generate() carries it "
                  "over the decode steps."},
    )
    router_pool_tokens: int = field(
        default=DEFAULT_POOL_TOKENS,
        metadata={"help": "K of router_scope='sequence': the gates come from the mean of the first K real tokens "
                  "(pick K larger than any prefix all your prompts share, e.g. a chat template's system prompt)."},
    )
    router_cosine: bool = field(
        default=False,
        metadata={"help": "True: logits = exp(s) * cos(W_g row i, router input), with a learned log scale s per "
                  f"router (initial exp(s) = {COSINE_INIT_SCALE:g}, at most 100), saved with the adapter; the router "
                  "gets a weight of its own (not rows of hydra_A)."},
    )
    router_center: bool = field(
        default=False,
        metadata={"help": "router_scope='sequence' only. True: the router sees the pooled input minus the running "
                  "mean of the pooled inputs seen in training (a buffer saved with the adapter, updated by training "
                  "forwards with momentum 0.1), so that prompts differ at the router from the start instead of "
                  "sharing one large common direction that sends every prompt to the same head."},
    )
    router_aux_loss_coef: float = field(
        default=0.0,
        metadata={"help": "Weight of the Switch load-balancing loss, added to the model's loss in training (0 = off)."},
    )
    dropout_per_head: bool = field(
        default=False,
        metadata={"help": "True: every head draws its own dropout mask on x (the authors' per-head loop)."},
    )
    head_init: str = field(
        default="zero",
        metadata={"help": "'zero' (paper), 'centered' (small random heads minus their mean) or 'orthogonal'."},
    )
    head_init_std: float = field(
        default=0.01, metadata={"help": "Scale (entry std / RMS) of the 'centered' and 'orthogonal' head inits."}
    )
    router_init_std: Optional[float] = field(
        default=None, metadata={"help": "None: nn.Linear's default router init; a float: normal(0, std)."}
    )
    router_aux_loss_warmup_steps: int = field(
        default=0, metadata={"help": "Ramp the balance-loss coefficient from 0 over this many optimizer steps."}
    )
    target_parameters: Optional[list[str]] = field(
        default=None, metadata={"help": "Not supported by HydraLoRA; must stay None."}
    )

    def __post_init__(self):
        super().__post_init__()
        self.peft_type = PeftType.HYDRALORA
        if isinstance(self.target_modules, list):
            self.target_modules = set(self.target_modules)
        if isinstance(self.exclude_modules, list):
            self.exclude_modules = set(self.exclude_modules)
        if isinstance(self.fixed_gates, tuple):
            self.fixed_gates = list(self.fixed_gates)

        def error(name: str, must: str):
            return ValueError(f"HydraLoraConfig.{name} must be {must}, got {getattr(self, name, None)!r}.")

        def number(v, low: float = -math.inf, low_ok: bool = True) -> bool:
            ok = not isinstance(v, bool) and isinstance(v, (int, float)) and math.isfinite(v)
            return ok and (v >= low if low_ok else v > low)

        def integer(v, low: int) -> bool:
            return not isinstance(v, bool) and isinstance(v, int) and v >= low

        ints = {"r": self.r, "num_experts": self.num_experts, **{f"rank_pattern[{k!r}]": v for k, v in self.rank_pattern.items()}}
        for name, value in ints.items():
            if not integer(value, 1):
                raise ValueError(f"HydraLoraConfig.{name} must be an integer >= 1, got {value!r}.")
        alphas = {"lora_alpha": self.lora_alpha, **{f"alpha_pattern[{k!r}]": v for k, v in self.alpha_pattern.items()}}
        for name, value in alphas.items():
            if not number(value):
                raise ValueError(f"HydraLoraConfig.{name} must be a finite number, got {value!r}.")
        if not (number(self.lora_dropout, 0.0) and self.lora_dropout < 1):
            raise error("lora_dropout", "in [0, 1)")
        if self.router_input not in ROUTER_INPUTS:
            raise error("router_input", f"one of {ROUTER_INPUTS} ('x': router on the layer input, 'a': on A x)")
        if self.top_k is not None and not (integer(self.top_k, 1) and self.top_k <= self.num_experts):
            raise error("top_k", f"None (dense gates) or an integer in [1, num_experts={self.num_experts}]")
        if not number(self.router_temperature, 0.0, low_ok=False):
            raise error("router_temperature", "> 0")
        if self.router_scope not in ROUTER_SCOPES:
            raise error("router_scope", f"one of {ROUTER_SCOPES} ('token': gates per token, 'sequence': per sequence)")
        if not integer(self.router_pool_tokens, 1):
            raise error("router_pool_tokens", "an integer >= 1 (the first K real tokens of a sequence give its gates)")
        if self.router_scope == "token" and self.router_pool_tokens != DEFAULT_POOL_TOKENS:
            raise ValueError(
                f"HydraLoraConfig.router_pool_tokens={self.router_pool_tokens} applies to router_scope='sequence', but "
                "router_scope='token': set router_scope='sequence' or leave router_pool_tokens at its default."
            )
        if not isinstance(self.router_cosine, bool):
            raise error("router_cosine", "True or False")
        if not isinstance(self.router_center, bool):
            raise error("router_center", "True or False")
        if self.router_center and self.router_scope != "sequence":
            raise ValueError(
                "HydraLoraConfig.router_center=True centres the pooled input of a sequence-scope router, but "
                f"router_scope={self.router_scope!r}: set router_scope='sequence' or router_center=False."
            )
        if not number(self.router_aux_loss_coef, 0.0):
            raise error("router_aux_loss_coef", "a number >= 0 (0 = off)")
        if not integer(self.router_aux_loss_warmup_steps, 0):
            raise error("router_aux_loss_warmup_steps", "an integer >= 0 (0 = off)")
        if self.head_init not in HEAD_INITS:
            raise error("head_init", f"one of {HEAD_INITS} ('zero': the paper's zero heads, 'centered': small random "
                        "heads minus their mean, 'orthogonal': centred heads in disjoint subspaces)")  # fmt: skip
        if not number(self.head_init_std, 0.0, low_ok=False):
            raise error("head_init_std", "a finite number > 0")
        if self.router_init_std is not None and not number(self.router_init_std, 0.0):
            raise error("router_init_std", "None (nn.Linear's default init) or a finite number >= 0")
        if self.fixed_gates is not None:
            if isinstance(self.fixed_gates, Mapping):
                if not self.fixed_gates:
                    raise ValueError(gates_error(self.fixed_gates, self.num_experts, "HydraLoraConfig.fixed_gates"))
                for name, gates in self.fixed_gates.items():
                    resolve_gates(gates, self.num_experts, what=f"HydraLoraConfig.fixed_gates[{name!r}]")
            else:
                resolve_gates(self.fixed_gates, self.num_experts, what="HydraLoraConfig.fixed_gates")
        # the router options need a learned router (N > 1, no fixed gates)
        why = "num_experts=1 has no router" if self.num_experts == 1 else "fixed_gates replace the router"
        needs_router = {
            "top_k": (self.top_k is not None and self.num_experts > 1, "set top_k=None"),
            "router_aux_loss_coef": (self.router_aux_loss_coef > 0, "set it to 0"),
            "router_init_std": (self.router_init_std is not None, "set router_init_std=None"),
            "router_scope": (self.router_scope != "token", "set router_scope='token'"),
            "router_cosine": (self.router_cosine, "set router_cosine=False"),
        }
        for name, (is_set, fix) in needs_router.items():
            if is_set and not self.has_router:
                raise ValueError(f"HydraLoraConfig.{name} applies to a learned router, but {why}: {fix}.")
        if self.router_aux_loss_warmup_steps > 0 and not self.router_aux_loss_coef > 0:
            raise ValueError(
                "HydraLoraConfig.router_aux_loss_warmup_steps > 0 ramps up the balance loss, which is off: set "
                "router_aux_loss_coef > 0 (e.g. 0.001) or router_aux_loss_warmup_steps=0."
            )
        if self.head_init != "zero" and (self.num_experts == 1 or not self.init_weights):
            raise ValueError(
                f"HydraLoraConfig.head_init={self.head_init!r} needs num_experts >= 2 (one centred head is zero) and "
                "init_weights=True (init_weights=False makes random heads for tests): use head_init='zero'."
            )
        if self.dropout_per_head and self.router_input == "a" and self.has_router and self.lora_dropout > 0:
            raise ValueError(
                "HydraLoraConfig.dropout_per_head=True with router_input='a' and lora_dropout > 0 is ambiguous: every "
                "head sees its own A dropout_i(x), so there is no single A x for the router. Use router_input='x' (the "
                "authors' setting, which dropout_per_head reproduces) or dropout_per_head=False."
            )
        if self.target_parameters is not None:
            raise error("target_parameters", "None (HydraLoRA adapts modules: use target_modules)")
        if isinstance(self.target_modules, str) and (self.layers_to_transform is not None or self.layers_pattern):
            raise ValueError(
                "HydraLoraConfig.layers_to_transform / layers_pattern cannot be used when target_modules is a regex str."
            )
        if self.layers_pattern and self.layers_to_transform is None:
            raise ValueError("HydraLoraConfig.layers_pattern needs layers_to_transform to be set too.")

    @property
    def has_router(self) -> bool:
        """True when the adapter has a learned router (N > 1 and no fixed gates)."""
        return self.num_experts > 1 and self.fixed_gates is None

    def layer_gates(self, layer_name: Optional[str] = None) -> Optional[torch.Tensor]:
        """The fixed gates of the layer ``layer_name`` as a float32 (N,) tensor; None with a learned router."""
        if self.fixed_gates is None:
            return torch.ones(1) if self.num_experts == 1 else None
        return resolve_gates(self.fixed_gates, self.num_experts, layer_name=layer_name, what="HydraLoraConfig.fixed_gates")

    @classmethod
    def paper_preset(cls, **overrides: Any) -> "HydraLoraConfig":
        """The HydraLoRA authors' configuration (github.com/Clin0212/HydraLoRA), every value overridable by keyword.

        Each value and the file of their repository it comes from:

        - ``target_modules=["gate_proj", "up_proj", "down_proj"]`` (the MLP only): ``lora_trainable`` in
          ``HydraLoRA/fine-tuning.sh`` and ``HydraLoRA/fine-tuning_dp.sh``;
        - ``r=4``, ``lora_alpha=32``, ``lora_dropout=0.05``: ``lora_rank``, ``lora_alpha``, ``lora_dropout`` in the
          same scripts; scaling ``lora_alpha / r`` = 8 as ``self.scaling = self.lora_alpha / self.r`` in
          ``HydraLoRA/peft/tuners/lora.py``;
        - ``num_experts=4``: ``lora_b_nums=4`` in the same scripts (passed as ``--lora_nums``);
        - ``dropout_per_head=True``: the forward in ``HydraLoRA/peft/tuners/lora.py`` loops over the heads and calls
          ``self.lora_dropout(x)`` once per head (a fresh mask per head);
        - ``router_input="x"``, dense softmax gates: ``lora_route = nn.Linear(in_features, lora_nums, bias=False)``
          applied to ``x``, softmax over the heads in float32 (same file);
        - ``task_type="CAUSAL_LM"``: ``TaskType.CAUSAL_LM`` in ``HydraLoRA/fine-tuning.py``.

        Initialisation matches theirs with the default ``init_weights=True`` (A Kaiming-uniform, every B zero, the
        router ``nn.Linear``'s default Kaiming-uniform); no balance loss (their ``blc_weight`` only acts with task
        labels, which their script does not pass), so ``router_aux_loss_coef=0``.

        Their training arguments (``HydraLoRA/fine-tuning.sh``, ``fine-tuning.py``), for ``TrainingArguments``:
        ``learning_rate=2e-4, lr_scheduler_type="cosine", warmup_ratio=0.03, weight_decay=0, num_train_epochs=1,
        bf16=True, per_device_train_batch_size=1, gradient_accumulation_steps=8`` (times 4 GPUs in
        ``fine-tuning_dp.sh``), ``max_seq_length=1024``, ``seed=41``.

        Example::

            config = HydraLoraConfig.paper_preset()                  # their setting
            config = HydraLoraConfig.paper_preset(num_experts=3)     # e.g. N from peft_hydra.suggest_num_experts
        """
        values: dict[str, Any] = dict(
            target_modules=["gate_proj", "up_proj", "down_proj"],
            r=4,
            lora_alpha=32,
            lora_dropout=0.05,
            num_experts=4,
            dropout_per_head=True,
            router_input="x",
            task_type="CAUSAL_LM",
        )
        values.update(overrides)
        return cls(**values)


# ----------------------------------------------------------------------------------------------------- gates
#: What every API that takes gates (``fixed_gates``, ``merge``, ``merge_and_unload``, ``export_lora``) accepts.
GATES_FORMS = (
    "'uniform', a list of num_experts non-negative numbers (not all zero), or a per-layer mapping "
    "{layer_name: [num_experts numbers]} such as peft_hydra.measure_mean_gates(model, batches)"
)


#: The type of every gate argument (see :func:`resolve_gates`).
GatesArg = Union[None, str, Sequence[float], torch.Tensor, Mapping[str, Sequence[float]]]


def gates_error(gates: Any, num_experts: int, what: str = "gates") -> str:
    """The one error text for gates that cannot be used."""
    shown = gates if not isinstance(gates, torch.Tensor) else gates.tolist()
    return f"`{what}` must be {GATES_FORMS.replace('num_experts', f'num_experts={num_experts}', 1)}; got {shown!r}."


def resolve_gates(
    gates: Any, num_experts: int, layer_name: Optional[str] = None, what: str = "gates"
) -> torch.Tensor:
    """Parse fixed gates into a float32 CPU tensor of shape (num_experts,). The one parser of every gate argument.

    ``gates`` is ``"uniform"``, N non-negative finite numbers (list, tuple or tensor) that are not all zero, or a
    mapping ``{layer_name: gates}`` (then ``layer_name`` picks the entry; per-layer gates as measured by
    :func:`peft_hydra.measure_mean_gates`). Anything else raises a ValueError with :func:`gates_error`'s text.
    """
    if isinstance(gates, Mapping):
        if layer_name is None or layer_name not in gates:
            examples = ", ".join(repr(k) for k in list(gates)[:2])
            raise ValueError(
                f"`{what}` is a per-layer mapping without an entry for layer {layer_name!r} (it has {len(gates)} "
                f"entries, e.g. {examples}): use the output of peft_hydra.measure_mean_gates on this model."
            )
        return resolve_gates(gates[layer_name], num_experts, what=f"{what}[{layer_name!r}]")
    if isinstance(gates, str):
        if gates != "uniform":
            raise ValueError(gates_error(gates, num_experts, what))
        return torch.full((num_experts,), 1.0 / num_experts)
    if isinstance(gates, bool) or gates is None:
        raise ValueError(gates_error(gates, num_experts, what))
    try:
        if isinstance(gates, (list, tuple)) and any(isinstance(g, bool) for g in gates):
            raise TypeError
        tensor = torch.as_tensor(gates).detach().to("cpu", torch.float32).flatten()
    except (TypeError, ValueError, RuntimeError):
        raise ValueError(gates_error(gates, num_experts, what)) from None
    if tensor.numel() != num_experts or not torch.isfinite(tensor).all() or (tensor < 0).any() or tensor.sum() <= 0:
        raise ValueError(gates_error(gates, num_experts, what))
    return tensor


def check_gate_layers(gates: Any, layer_names, what: str = "gates") -> None:
    """A per-layer gates mapping must name only layers the adapter has (a typo would otherwise be ignored)."""
    if isinstance(gates, Mapping):
        unknown = sorted(set(gates) - set(layer_names))
        if unknown:
            raise ValueError(
                f"`{what}` names {len(unknown)} layer(s) the adapter does not have, e.g. {unknown[:3]}; its layers are "
                f"e.g. {sorted(layer_names)[:3]}: use the output of peft_hydra.measure_mean_gates on this model."
            )


def no_exact_merge_message(adapter: str, num_experts: int) -> str:
    """The one error text for merging / exporting an adapter with a learned router without fixed gates."""
    return (
        f"Cannot merge or export HydraLoRA adapter '{adapter}' without fixed gates: it has a learned router that "
        f"routes every token through its own mix of {num_experts} heads, so no single weight matrix equals it. Pass "
        "fixed gates (gates='uniform', a list of "
        f"{num_experts} numbers, or the per-layer mean gates of peft_hydra.measure_mean_gates(model, batches)) to "
        "`merge_and_unload` / `merge_adapter` / `peft_hydra.export_lora`; they merge sum_i g_i B_i A, the model with "
        "those gates fixed (an approximation of the routed model). Or keep the adapter unmerged."
    )
