"""`HydraLoraConfig`: the PEFT config dataclass of HydraLoRA."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional, Union

from peft.config import PeftConfig

from ._registry import PEFT_TYPE_NAME

#: Default ``target_modules`` for Llama-like decoders (Llama, Mistral, Qwen2/3, Gemma, SmolLM, ...): every linear
#: layer of attention and MLP, as in the HydraLoRA authors' training scripts. Used when ``target_modules`` is None
#: and the model's ``model_type`` is one of :data:`LLAMA_LIKE_MODEL_TYPES`; other models fall back to PEFT's LoRA
#: defaults.
LLAMA_LIKE_TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LLAMA_LIKE_MODEL_TYPES = (
    "llama", "mistral", "mixtral", "qwen2", "qwen3", "qwen2_moe", "gemma", "gemma2", "gemma3_text", "phi3",
    "olmo", "olmo2", "granite", "cohere", "starcoder2", "smollm3",
)  # fmt: skip

ROUTER_INPUTS = ("x", "a")


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
        init_weights (`bool`): True (default): ``A`` Kaiming-uniform, every ``B_i`` zero (the adapter starts as the
            identity), router ``nn.Linear`` default init. False: ``B`` random too (only for tests).
        router_input (`str`): What the router sees. ``"x"`` (default, the authors' code): the layer input, router
            in -> N. ``"a"`` (the paper's description): ``A dropout(x)``, router r -> N.
        top_k (`int | None`): None: dense softmax gates. k: keep the k largest gates per token, renormalised to sum 1.
        router_temperature (`float`): Softmax temperature of the router (> 0).
        share_a (`bool`): True (HydraLoRA): one ``A`` shared by all heads. False: every head has its own ``A_i`` (the
            paper's "LoRA-split" ablation, routed like HydraLoRA); ``A`` then has N*r rows.
        fixed_gates (`str | list[float] | None`): None: learned router. ``"uniform"`` or N non-negative weights: fixed
            gates, no router (the paper's uniform-gate ablation). Fixed gates also make an exact merge possible.
        router_aux_loss_coef (`float`): Weight of the Switch-style load-balancing loss that
            ``model.hydra_aux_loss()`` returns (0 = off, the default). The loss is not added to the model's loss by
            itself: add it in the training loop (see ``peft_hydra.integrations``).
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
    fixed_gates: Optional[Union[str, list[float]]] = field(
        default=None, metadata={"help": "None: learned router; 'uniform' or N weights: fixed gates, no router."}
    )
    router_aux_loss_coef: float = field(
        default=0.0, metadata={"help": "Weight of the load-balancing loss returned by model.hydra_aux_loss()."}
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
            gates = self.fixed_gates
            ok = gates == "uniform" or (
                isinstance(gates, (list, tuple))
                and len(gates) == self.num_experts
                and all(isinstance(g, (int, float)) and not isinstance(g, bool) and g >= 0 for g in gates)
                and sum(gates) > 0
            )
            if not ok:
                raise ValueError(
                    "HydraLoraConfig.fixed_gates must be None (learned router), 'uniform', or a list of "
                    f"num_experts={self.num_experts} non-negative numbers, not all zero, got {gates!r}."
                )
            if isinstance(gates, tuple):
                self.fixed_gates = list(gates)
            if self.top_k is not None:
                raise ValueError("HydraLoraConfig.top_k applies to a learned router: set top_k=None with fixed_gates.")
            if self.router_aux_loss_coef > 0:
                raise ValueError(
                    "HydraLoraConfig.router_aux_loss_coef > 0 needs a learned router: set it to 0 with fixed_gates."
                )
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

    @property
    def has_router(self) -> bool:
        """True when the adapter has a learned router (N > 1 and no fixed gates)."""
        return self.num_experts > 1 and self.fixed_gates is None

    def gate_vector(self) -> Optional[list[float]]:
        """The fixed gates as a list of N floats (None with a learned router)."""
        if self.fixed_gates is None:
            return [1.0] if self.num_experts == 1 else None
        if self.fixed_gates == "uniform":
            return [1.0 / self.num_experts] * self.num_experts
        return [float(g) for g in self.fixed_gates]
