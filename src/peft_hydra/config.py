"""`HydraLoraConfig`: the PEFT config dataclass of HydraLoRA."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Sequence, Union

import torch
from peft.config import PeftConfig

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
#: The values of ``HydraLoraConfig.head_init`` (see its docstring and ``functional.init_heads``).
HEAD_INITS = ("zero", "centered", "orthogonal")


@dataclass
class HydraLoraConfig(PeftConfig):
    """Configuration of a HydraLoRA adapter (arXiv 2404.19245).

    Per targeted linear layer HydraLoRA adds one shared down-projection ``A`` (r x in), ``num_experts`` up-projection
    heads ``B_i`` (out x r) and a router ``W_g`` (in -> N, no bias):

        y = W0 x + scaling * sum_i w_i(x) B_i A dropout(x),    w(x) = softmax(W_g x / router_temperature)

    with ``scaling = lora_alpha / r`` (or ``lora_alpha / sqrt(r)`` with ``use_rslora``). ``num_experts=1`` is exactly
    LoRA (no router is created).

    Args:
        r (`int`): Rank of the shared ``A`` (and of every head ``B_i``).
        lora_alpha (`float`): Scaling numerator, as in LoRA.
        lora_dropout (`float`): Dropout on the adapter input, in ``[0, 1)``.
        num_experts (`int`): N, the number of ``B`` heads. ``peft_hydra.suggest_num_experts(texts)`` picks one from a
            corpus (TF-IDF + k-means elbow, as in the paper); 2-4 is typical.
        target_modules (`list[str] | str`): Modules to adapt, as in LoRA (names, suffixes, a regex, or
            ``"all-linear"``). ``None`` uses :data:`LLAMA_LIKE_TARGET_MODULES` for Llama-like models.
        exclude_modules (`list[str] | str`): Modules not to adapt.
        layers_to_transform (`list[int] | int`): Only adapt these layer indices.
        layers_pattern (`list[str] | str`): Name of the layer list (``"layers"``, ``"h"``) for ``layers_to_transform``.
        modules_to_save (`list[str]`): Extra modules trained in full and saved with the adapter.
        fan_in_fan_out (`bool`): True for layers that store the weight as (in, out), e.g. GPT-2's ``Conv1D``
            (set automatically, with a warning, when such a layer is targeted).
        use_rslora (`bool`): Rank-stabilised scaling ``lora_alpha / sqrt(r)``.
        rank_pattern (`dict`): Per-module rank overrides, ``{regex_or_name: r}``.
        alpha_pattern (`dict`): Per-module alpha overrides, ``{regex_or_name: alpha}``.
        init_weights (`bool`): True (default): ``A`` Kaiming-uniform, the ``B_i`` as ``head_init`` says (zero by
            default: the adapter starts as the identity), router ``nn.Linear`` default init (or
            ``router_init_std``). False: ``B`` random too (only for tests).
        router_input (`str`): What the router sees. ``"x"`` (default, the authors' code): the layer input, router
            in -> N. ``"a"`` (the paper's description): ``A dropout(x)``, router r -> N.
        top_k (`int | None`): None: dense softmax gates. k: keep the k largest gates per token, renormalised to sum 1.
        router_temperature (`float`): Softmax temperature of the router (> 0).
        share_a (`bool`): True (HydraLoRA): one ``A`` shared by all heads. False: every head has its own ``A_i`` (the
            paper's "LoRA-split" ablation, routed like HydraLoRA); ``A`` then has N*r rows.
        fixed_gates (`str | list[float] | dict | None`): None: learned router. Fixed gates, no router: ``"uniform"``
            (the paper's uniform-gate ablation), N non-negative weights, or per-layer weights ``{layer_name: [N]}``
            (e.g. from ``peft_hydra.measure_mean_gates``). Fixed gates also make an exact merge possible.
        router_aux_loss_coef (`float`): Weight of the Switch-style load-balancing loss that
            ``model.hydra_aux_loss()`` returns (0 = off, the default). The loss is not added to the model's loss by
            itself: add it in the training loop (see ``peft_hydra.integrations``).
        dropout_per_head (`bool`): False (default): one dropout mask on ``x`` shared by all heads, so ``A dropout(x)``
            is computed once. True: every head draws its own mask, as the authors' per-head loop does
            (``sum_i w_i B_i A dropout_i(x)``); costs N times the ``A`` GEMM in training (no effect in eval mode or
            with ``lora_dropout=0``).
        head_init (`str`): How the N ``B`` heads start (cold-start remedies; the default keeps the paper's init).

            - ``"zero"`` (default, the authors' code and the paper): every head zero, so the adapter starts as the
              identity. The heads are then symmetric: the router's weight gets exactly zero gradient on the first
              step (the output does not depend on the gates while every head is zero), and under a near-uniform
              router every head gets the same gradient up to its gate, so the router gets next to no signal to
              separate them (the "cold-start deadlock" described by Ortho-Hydra, arXiv 2605.03252).
            - ``"centered"``: small random heads minus their mean over the heads (``functional.centered_heads``):
              ``B_i = s * (G_i - mean_j G_j) * sqrt(N / (N - 1))`` with ``G`` standard normal and ``s =
              head_init_std`` (every entry then has standard deviation ``s``). Since ``sum_i B_i = 0`` the initial
              update ``scaling * sum_i g_i B_i A x = scaling * sum_i (g_i - 1/N) B_i A x`` is exactly zero under
              uniform gates and of order ``s * |g - 1/N|`` otherwise, while the heads differ from step 1, so the
              router gets a gradient from step 1. The multi-head random initialisation of R-LoRA (arXiv
              2502.15455), centred so that the model starts where the zero init does (R-LoRA's heads are not
              centred).
            - ``"orthogonal"``: heads writing to disjoint, mutually orthogonal output subspaces
              (``functional.orthogonal_heads``): ``Q`` (out x N*r) with orthonormal columns (QR of a Gaussian
              matrix), head i = columns ``i*r .. (i+1)*r - 1``, then centred as above and scaled so that every
              entry has root-mean-square ``head_init_std``: ``B_i = c (Q_i - mean_j Q_j)``, ``c = s * sqrt(out * N /
              (N - 1))``. Initial output as for ``"centered"`` (exactly zero under uniform gates); the differences
              ``B_i - B_j = c (Q_i - Q_j)`` lie in disjoint subspaces and every pair of heads has cosine exactly
              ``-1/(N-1)`` (the most dissimilar N heads that sum to zero; for N = 2, ``B_2 = -B_1``). After
              Ortho-Hydra's disjoint per-expert output subspaces (anima_lora, github.com/sorryhyun/anima_lora), which
              carve them from the pretrained weight's top singular vectors; here they are random. Needs
              ``out_features >= num_experts * r`` in every adapted layer.

            With ``share_a=False`` (one ``A_i`` per head) the centred heads do not cancel (``sum_i B_i A_i x != 0``):
            the initial output is then small (of order ``head_init_std``) but not zero.
        head_init_std (`float`): ``s`` above, the scale of the non-zero head inits (> 0; not used by ``"zero"``).
        router_init_std (`float | None`): None (default): the router keeps ``nn.Linear``'s default init
            (Kaiming-uniform, the authors'). A float: router weight ~ normal(0, router_init_std) (0 = all zero:
            exactly uniform gates at the start). A small std starts the router near uniform, as Switch Transformer's
            reduced initialisation scale (arXiv 2101.03961) does. Needs a learned router.
        router_aux_loss_warmup_steps (`int`): 0 (default): no warm-up. K > 0: the balance-loss coefficient ramps
            linearly from 0 at optimizer step 0 to ``router_aux_loss_coef`` at step K
            (``functional.aux_loss_warmup_coef``), so that the loss does not pin the gates to uniform before the
            heads have differentiated. The step is passed as ``model.hydra_aux_loss(step=...)``;
            ``peft_hydra.prepare_trainer`` passes ``trainer.state.global_step``. Needs ``router_aux_loss_coef > 0``.
    """

    r: int = field(default=8, metadata={"help": "Rank of the shared A and of each B head."})
    lora_alpha: float = field(default=8, metadata={"help": "Scaling numerator: scaling = lora_alpha / r."})
    lora_dropout: float = field(default=0.0, metadata={"help": "Dropout probability on the adapter input."})
    num_experts: int = field(default=3, metadata={"help": "N, the number of B heads (1 = LoRA)."})
    target_modules: Optional[Union[list[str], str]] = field(
        default=None,
        metadata={"help": "Module names, suffixes, a regex or 'all-linear'. None: Llama-like default."},
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
    rank_pattern: dict = field(default_factory=dict, metadata={"help": "Per-module rank overrides."})
    alpha_pattern: dict = field(default_factory=dict, metadata={"help": "Per-module alpha overrides."})
    init_weights: bool = field(default=True, metadata={"help": "True: A Kaiming-uniform, B zero (identity start)."})
    router_input: str = field(default="x", metadata={"help": "'x' (router on the input) or 'a' (router on A x)."})
    top_k: Optional[int] = field(default=None, metadata={"help": "None: dense gates; k: keep the k largest."})
    router_temperature: float = field(default=1.0, metadata={"help": "Softmax temperature of the router."})
    share_a: bool = field(default=True, metadata={"help": "False: one A per head (the LoRA-split ablation)."})
    fixed_gates: Optional[Union[str, list[float], dict[str, list[float]]]] = field(
        default=None,
        metadata={"help": "None: learned router; 'uniform', N weights or {layer: N weights}: fixed gates, no router."},
    )
    router_aux_loss_coef: float = field(
        default=0.0, metadata={"help": "Weight of the load-balancing loss returned by model.hydra_aux_loss()."}
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
        default=None, metadata={"help": "None: nn.Linear default router init; a float: normal(0, std)."}
    )
    router_aux_loss_warmup_steps: int = field(
        default=0, metadata={"help": "Ramp the balance-loss coefficient from 0 over this many optimizer steps."}
    )
    target_parameters: Optional[list[str]] = field(
        default=None, metadata={"help": "Not supported by HydraLoRA; must stay None."}
    )

    def __post_init__(self):
        super().__post_init__()
        from peft.utils import PeftType

        self.peft_type = PeftType(PEFT_TYPE_NAME)  # added by peft_hydra._registry on import
        if isinstance(self.target_modules, list):
            self.target_modules = set(self.target_modules)
        if isinstance(self.exclude_modules, list):
            self.exclude_modules = set(self.exclude_modules)
        self.validate()

    def validate(self) -> None:
        """Raise a ValueError naming the field and its allowed values for every invalid setting."""

        def positive_int(name, value):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"HydraLoraConfig.{name} must be an integer >= 1, got {value!r}.")

        positive_int("r", self.r)
        positive_int("num_experts", self.num_experts)
        for key, value in self.rank_pattern.items():
            positive_int(f"rank_pattern[{key!r}]", value)
        alphas = [("lora_alpha", self.lora_alpha)]
        alphas += [(f"alpha_pattern[{key!r}]", value) for key, value in self.alpha_pattern.items()]
        for name, value in alphas:
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"HydraLoraConfig.{name} must be a finite number, got {value!r}.")
        if not (isinstance(self.lora_dropout, (int, float)) and 0.0 <= self.lora_dropout < 1.0):
            raise ValueError(f"HydraLoraConfig.lora_dropout must be in [0, 1), got {self.lora_dropout!r}.")
        if self.router_input not in ROUTER_INPUTS:
            raise ValueError(
                f"HydraLoraConfig.router_input must be one of {ROUTER_INPUTS} ('x': router on the layer input, "
                f"'a': router on A x), got {self.router_input!r}."
            )
        if self.top_k is not None:
            if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or not 1 <= self.top_k <= self.num_experts:
                raise ValueError(
                    f"HydraLoraConfig.top_k must be None (dense gates) or an integer in [1, num_experts={self.num_experts}],"
                    f" got {self.top_k!r}."
                )
        if not (isinstance(self.router_temperature, (int, float)) and self.router_temperature > 0):
            raise ValueError(f"HydraLoraConfig.router_temperature must be > 0, got {self.router_temperature!r}.")
        if not (isinstance(self.router_aux_loss_coef, (int, float)) and self.router_aux_loss_coef >= 0):
            raise ValueError(
                f"HydraLoraConfig.router_aux_loss_coef must be >= 0 (0 = off), got {self.router_aux_loss_coef!r}."
            )
        if self.fixed_gates is not None:
            if isinstance(self.fixed_gates, tuple):
                self.fixed_gates = list(self.fixed_gates)
            if isinstance(self.fixed_gates, Mapping):
                if not self.fixed_gates:
                    raise ValueError(gates_error(self.fixed_gates, self.num_experts, "HydraLoraConfig.fixed_gates"))
                for name, gates in self.fixed_gates.items():
                    resolve_gates(gates, self.num_experts, what=f"HydraLoraConfig.fixed_gates[{name!r}]")
            else:
                resolve_gates(self.fixed_gates, self.num_experts, what="HydraLoraConfig.fixed_gates")
            if self.top_k is not None:
                raise ValueError("HydraLoraConfig.top_k applies to a learned router: set top_k=None with fixed_gates.")
            if self.router_aux_loss_coef > 0:
                raise ValueError(
                    "HydraLoraConfig.router_aux_loss_coef > 0 needs a learned router: set it to 0 with fixed_gates."
                )
        if self.dropout_per_head and self.router_input == "a" and self.has_router and self.lora_dropout > 0:
            raise ValueError(
                "HydraLoraConfig.dropout_per_head=True with router_input='a' and lora_dropout > 0 is ambiguous: every "
                "head sees its own A dropout_i(x), so there is no single A x for the router. Use router_input='x' (the "
                "authors' setting, which dropout_per_head reproduces) or dropout_per_head=False."
            )
        self._validate_init()
        if self.num_experts == 1 and self.router_aux_loss_coef > 0:
            raise ValueError("HydraLoraConfig.router_aux_loss_coef > 0 needs num_experts >= 2 (N=1 has no router).")
        if self.target_parameters is not None:
            raise ValueError("HydraLoraConfig.target_parameters is not supported: use target_modules.")
        if isinstance(self.target_modules, str) and self.layers_to_transform is not None:
            raise ValueError("HydraLoraConfig.layers_to_transform cannot be used when target_modules is a regex str.")
        if isinstance(self.target_modules, str) and self.layers_pattern is not None:
            raise ValueError("HydraLoraConfig.layers_pattern cannot be used when target_modules is a regex str.")
        if self.layers_pattern and self.layers_to_transform is None:
            raise ValueError("HydraLoraConfig.layers_pattern needs layers_to_transform to be set too.")

    def _validate_init(self) -> None:
        """The cold-start options: head_init, head_init_std, router_init_std, router_aux_loss_warmup_steps."""
        if self.head_init not in HEAD_INITS:
            raise ValueError(
                f"HydraLoraConfig.head_init must be one of {HEAD_INITS} ('zero': the paper's zero heads, 'centered': "
                f"small random heads minus their mean, 'orthogonal': centred heads in disjoint subspaces), got "
                f"{self.head_init!r}."
            )
        std = self.head_init_std
        if isinstance(std, bool) or not isinstance(std, (int, float)) or not (math.isfinite(std) and std > 0):
            raise ValueError(f"HydraLoraConfig.head_init_std must be a finite number > 0, got {std!r}.")
        if self.head_init != "zero":
            if self.num_experts == 1:
                raise ValueError(
                    f"HydraLoraConfig.head_init={self.head_init!r} needs num_experts >= 2: with one head the centred "
                    "init is zero (and there is no router to start). Use head_init='zero'."
                )
            if not self.init_weights:
                raise ValueError(
                    f"HydraLoraConfig.head_init={self.head_init!r} conflicts with init_weights=False (random B for "
                    "tests): keep init_weights=True with a non-zero head_init."
                )
        rstd = self.router_init_std
        if rstd is not None:
            if isinstance(rstd, bool) or not isinstance(rstd, (int, float)) or not (math.isfinite(rstd) and rstd >= 0):
                raise ValueError(
                    f"HydraLoraConfig.router_init_std must be None (nn.Linear's default init) or a finite number >= 0,"
                    f" got {rstd!r}."
                )
            if not self.has_router:
                raise ValueError(
                    "HydraLoraConfig.router_init_std is set but the adapter has no learned router (num_experts=1 or "
                    "fixed_gates): set router_init_std=None."
                )
        warm = self.router_aux_loss_warmup_steps
        if isinstance(warm, bool) or not isinstance(warm, int) or warm < 0:
            raise ValueError(
                f"HydraLoraConfig.router_aux_loss_warmup_steps must be an integer >= 0 (0 = off), got {warm!r}."
            )
        if warm > 0 and not self.router_aux_loss_coef > 0:
            raise ValueError(
                "HydraLoraConfig.router_aux_loss_warmup_steps > 0 ramps up the balance loss, which is off: set "
                "router_aux_loss_coef > 0 (e.g. 0.001) or router_aux_loss_warmup_steps=0."
            )

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
