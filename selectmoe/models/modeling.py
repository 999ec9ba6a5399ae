"""Select-MoE on transformers' OLMoE classes: subclasses that override only what changes.

Module names stay OLMoE's (``model.layers.N.mlp.gate``, ``mlp.experts``), so an OLMoE checkpoint
loads straight in; the only new weights are ``model.layers.N.mlp.quality_gate.weight``.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn
from transformers.modeling_outputs import MoeCausalLMOutputWithPast
from transformers.models.olmoe.modeling_olmoe import (
    OlmoeAttention,
    OlmoeDecoderLayer,
    OlmoeForCausalLM,
    OlmoeModel,
    OlmoePreTrainedModel,
    OlmoeRMSNorm,
    OlmoeRotaryEmbedding,
    OlmoeSparseMoeBlock,
    OlmoeTopKRouter,
    load_balancing_loss_func,
)
from transformers.utils.output_capturing import OutputRecorder

from selectmoe.data.template import IGNORE_INDEX
from selectmoe.models.configuration import SelectMoeConfig
from selectmoe.models.losses import quality_loss

TrashExpert = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
TRASH_EXPERTS: dict[str, TrashExpert] = {}
_NOISE_BLOCK = 256  # positions per seeded noise block


def register_trash_expert(name: str, fn: TrashExpert, overwrite: bool = False) -> None:
    """Register ``fn(expert_output, hidden_states) -> tensor`` for ``trash_expert_mode='custom'``."""
    if name in TRASH_EXPERTS and not overwrite:
        raise ValueError(f"trash expert {name!r} is already registered; pass overwrite=True to replace it")
    TRASH_EXPERTS[name] = fn


class SelectMoeQualityGate(nn.Linear):
    """Bias-free ``Linear(hidden, 1)`` on the same normalised hidden state as the MoE router."""

    def __init__(self, config: SelectMoeConfig):
        super().__init__(config.hidden_size, 1, bias=False)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        # the gate may be kept in fp32 while the body runs in bf16
        return super().forward(hidden_states.to(self.weight.dtype))


class SelectMoeTopKRouter(OlmoeTopKRouter):
    def forward(self, hidden_states):
        # diff with OLMoE: cast to the router's dtype (fp32 router weights over a bf16 body)
        return super().forward(hidden_states.to(self.weight.dtype))


class SelectMoeTrashExpert(nn.Module):
    """What a shut gate lets through instead of the experts' output."""

    def __init__(self, config: SelectMoeConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self._noise_blocks: dict[int, torch.Tensor] = {}

    def forward(self, expert_output, hidden_states, position_ids):
        mode = self.config.trash_expert_mode
        if mode == "zero":
            return torch.zeros_like(expert_output)
        if mode == "noise":
            # statistics detached: the trash path trains the gate, not the experts
            stats = expert_output.detach().float()
            mean = stats.mean(dim=-1, keepdim=True)
            std = stats.std(dim=-1, keepdim=True)
            return (mean + std * self._noise(position_ids, expert_output.shape)).to(expert_output.dtype)
        name = self.config.custom_trash_expert
        if name not in TRASH_EXPERTS:
            raise ValueError(
                f"custom trash expert {name!r} is not registered; registered: {sorted(TRASH_EXPERTS)}"
            )
        return TRASH_EXPERTS[name](expert_output, hidden_states)

    def _noise(self, position_ids: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        """Standard normal noise fixed per (seed, layer, position): independent of batch and padding."""
        batch, seq, hidden = shape
        positions = position_ids.expand(batch, seq).clamp(min=0)
        needed = int(positions.max().item()) // _NOISE_BLOCK + 1
        table = torch.cat([self._noise_block(i, hidden) for i in range(needed)])
        return table.to(position_ids.device)[positions]  # (B, T, H)

    def _noise_block(self, index: int, hidden: int) -> torch.Tensor:
        if index not in self._noise_blocks:
            seed = (self.config.trash_noise_seed * 1_000_003 + self.layer_idx * 10_007 + index) % (2**63)
            gen = torch.Generator().manual_seed(seed)
            self._noise_blocks[index] = torch.randn(_NOISE_BLOCK, hidden, generator=gen)
        return self._noise_blocks[index]


class SelectMoeSparseMoeBlock(OlmoeSparseMoeBlock):
    """diff with OLMoE: a quality gate mixes the experts' output with the trash expert's."""

    def __init__(self, config: SelectMoeConfig, layer_idx: int = 0):
        super().__init__(config)
        self.gate = SelectMoeTopKRouter(config)
        self.quality_gate = SelectMoeQualityGate(config)
        self.trash_expert = SelectMoeTrashExpert(config, layer_idx)
        self.forced_gate: float | None = None  # set by `gates_forced`: g is this value exactly
        self.gate_shift: torch.Tensor | None = None  # set by `gates_shifted`: added to g, (B, T, 1)

    def forward(self, hidden_states: torch.Tensor, position_ids: torch.Tensor | None = None):
        batch_size, seq_len, hidden_dim = hidden_states.shape
        quality_score = self.quality_gate(hidden_states)  # (B, T, 1)
        flat = hidden_states.view(-1, hidden_dim)
        router_logits, top_k_weights, top_k_index = self.gate(flat)  # (B*T, E), (B*T, k), (B*T, k)
        expert_output = self.experts(flat, top_k_index, top_k_weights.to(flat.dtype))
        expert_output = expert_output.view(batch_size, seq_len, hidden_dim)
        if position_ids is None:
            position_ids = torch.arange(seq_len, device=hidden_states.device).unsqueeze(0)
        trash = self.trash_expert(expert_output, hidden_states, position_ids)
        if self.forced_gate is None:
            good = torch.sigmoid(quality_score)
        else:
            good = torch.full_like(quality_score, self.forced_gate)
        if self.gate_shift is not None:
            good = good + self.gate_shift
        mixed = good * expert_output + (1.0 - good) * trash
        # the second output is what `outputs.router_logits` records for this layer (seed API)
        return mixed.to(hidden_states.dtype), {"quality_score": quality_score, "moe_logits": router_logits}


@contextmanager
def gates_shifted(model: nn.Module, shifts: list[torch.Tensor]):
    """Within the block layer l's gate is g + ``shifts[l]`` ((B, T, 1), broadcast): a differentiable
    handle on the gates, for derivatives of a row's loss with respect to them."""
    blocks = [m for m in model.modules() if isinstance(m, SelectMoeSparseMoeBlock)]
    if len(shifts) != len(blocks):
        raise ValueError(f"{len(shifts)} gate shifts for {len(blocks)} MoE layers")
    for block, shift in zip(blocks, shifts):
        block.gate_shift = shift
    try:
        yield model
    finally:
        for block in blocks:
            block.gate_shift = None


@contextmanager
def gates_forced(model: nn.Module, value: float):
    """Within the block every quality gate is ``value``: 1 passes the experts' output unchanged (the
    OLMoE equivalence check), 0 replaces it with the trash expert's (the experts' effect on a row)."""
    blocks = [m for m in model.modules() if isinstance(m, SelectMoeSparseMoeBlock)]
    for block in blocks:
        block.forced_gate = float(value)
    try:
        yield model
    finally:
        for block in blocks:
            block.forced_gate = None


@contextmanager
def base_model_view(model: nn.Module):
    """Within the block the model computes what the model stage 1 started from does: the base's values
    of the tensors stage 1 changed (``model.base_weights``, kept by ``load_select_moe(...,
    keep_base_weights=True)``) are swapped in, without a copy, and every quality gate is open."""
    base = getattr(model, "base_weights", None)
    if base is None:
        raise ValueError(
            "base_model_view needs a model loaded with load_select_moe(..., keep_base_weights=True)"
        )
    params = dict(model.named_parameters())
    trained = {name: params[name].data for name in base}
    try:
        for name, value in base.items():
            params[name].data = value
        with gates_forced(model, 1.0):
            yield model
    finally:
        for name, value in trained.items():
            params[name].data = value


class SelectMoeDecoderLayer(OlmoeDecoderLayer):
    def __init__(self, config: SelectMoeConfig, layer_idx: int):
        super().__init__(config, layer_idx)
        self.mlp = SelectMoeSparseMoeBlock(config, layer_idx)

    def forward(
        self,
        hidden_states,
        attention_mask=None,
        position_ids=None,
        cache=None,
        use_cache=False,
        position_embeddings=None,
        **kwargs,
    ):
        residual = hidden_states
        hidden_states = self.input_layernorm(hidden_states)
        hidden_states, _ = self.self_attn(
            hidden_states=hidden_states,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            use_cache=use_cache,
            position_embeddings=position_embeddings,
            **kwargs,
        )
        hidden_states = residual + hidden_states
        residual = hidden_states
        hidden_states = self.post_attention_layernorm(hidden_states)
        # diff with OLMoE: the MoE block also gets the positions (the noise trash expert is keyed by them)
        hidden_states, _ = self.mlp(hidden_states, position_ids)
        return residual + hidden_states


class SelectMoePreTrainedModel(OlmoePreTrainedModel):
    config: SelectMoeConfig
    config_class = SelectMoeConfig
    _no_split_modules = ["SelectMoeDecoderLayer"]
    # diff with OLMoE: router_logits records the per-layer {"quality_score", "moe_logits"} dicts
    _can_record_outputs = {
        "router_logits": OutputRecorder(SelectMoeSparseMoeBlock, index=1),
        "hidden_states": SelectMoeDecoderLayer,
        "attentions": OlmoeAttention,
    }

    @classmethod
    def _can_set_experts_implementation(cls) -> bool:
        # diff with OLMoE: transformers looks for its experts decorator in the model's own source file;
        # ours reuses OLMoE's decorated experts, so eager / grouped_mm / batched_mm all apply
        return True

    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, SelectMoeQualityGate):
            init_quality_gate(module, self.config)

    def activation_checkpointing_enable(self, activation_checkpointing_kwargs=None, **kwargs):
        # diff with OLMoE: never reentrant. Reentrant checkpointing runs the layer under no_grad, so the
        # recorded gate scores carry no gradient and the quality loss trains nothing (a seed defect).
        activation_checkpointing_kwargs = {**(activation_checkpointing_kwargs or {}), "use_reentrant": False}
        self._activation_checkpointing_enable(activation_checkpointing_kwargs, **kwargs)

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs=None, **kwargs):
        self.activation_checkpointing_enable(gradient_checkpointing_kwargs, **kwargs)


def init_quality_gate(gate: nn.Linear, config: SelectMoeConfig, generator: torch.Generator | None = None):
    with torch.no_grad():
        values = torch.empty(gate.weight.shape, dtype=torch.float32)
        values.normal_(config.quality_gate_init_mean, config.quality_gate_init_std, generator=generator)
        gate.weight.copy_(values)


class SelectMoeModel(SelectMoePreTrainedModel, OlmoeModel):
    def __init__(self, config: SelectMoeConfig):
        SelectMoePreTrainedModel.__init__(self, config)  # OlmoeModel.__init__ would build OLMoE layers first
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList(
            [SelectMoeDecoderLayer(config, layer_idx) for layer_idx in range(config.num_hidden_layers)]
        )
        self.norm = OlmoeRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = OlmoeRotaryEmbedding(config=config)
        self.gradient_checkpointing = False
        self.post_init()

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, **kwargs):
        if position_ids is None and attention_mask is not None and attention_mask.dim() == 2:
            # diff with OLMoE: positions count real tokens, so left padding gives a row the same
            # positions (and noise) as no padding; right padding is unchanged.
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        return super().forward(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, **kwargs
        )


@dataclass
class SelectMoeCausalLMOutput(MoeCausalLMOutputWithPast):
    """OLMoE's output plus the loss terms, for logging."""

    lm_loss: torch.FloatTensor | None = None
    quality_loss: torch.FloatTensor | None = None
    load_balancing_loss: torch.FloatTensor | None = None


class SelectMoeForCausalLM(SelectMoePreTrainedModel, OlmoeForCausalLM):
    def __init__(self, config: SelectMoeConfig):
        SelectMoePreTrainedModel.__init__(self, config)  # OlmoeForCausalLM.__init__ would build an OlmoeModel
        self.model = SelectMoeModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.router_aux_loss_coef = config.router_aux_loss_coef
        self.num_experts = config.num_experts
        self.num_experts_per_tok = config.num_experts_per_tok
        self.post_init()

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        position_ids=None,
        cache=None,
        inputs_embeds=None,
        labels=None,
        use_cache=None,
        output_router_logits=None,
        logits_to_keep=0,
        **kwargs,
    ) -> SelectMoeCausalLMOutput:
        if output_router_logits is None:
            output_router_logits = self.config.output_router_logits
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_router_logits=output_router_logits,
            **kwargs,
        )
        hidden_states = outputs.last_hidden_state
        if isinstance(logits_to_keep, int) and logits_to_keep > 0:
            hidden_states = hidden_states[:, -logits_to_keep:, :]
        elif not isinstance(logits_to_keep, int):
            hidden_states = hidden_states[:, logits_to_keep, :]
        logits = self.lm_head(hidden_states)

        lm_loss = (
            self.loss_function(logits, labels, self.vocab_size, **kwargs) if labels is not None else None
        )
        loss = lm_loss
        aux_loss = q_loss = lb_loss = None
        router_logits = outputs.router_logits
        if output_router_logits and router_logits:
            # diff with OLMoE: aux = (load balancing) + quality_loss_weight * quality loss, as in the seed
            mask = self._quality_loss_mask(router_logits[0]["quality_score"], attention_mask, labels)
            q_loss = quality_loss([layer["quality_score"] for layer in router_logits], mask, self.config)
            aux_loss = self.config.quality_loss_weight * q_loss
            if self.config.enable_load_balancing:
                lb_loss = load_balancing_loss_func(
                    tuple(layer["moe_logits"] for layer in router_logits),
                    self.num_experts,
                    self.num_experts_per_tok,
                    attention_mask,
                )
                aux_loss = aux_loss + lb_loss
            if loss is not None:
                loss = loss + self.config.router_aux_loss_coef * aux_loss.to(loss.device)

        return SelectMoeCausalLMOutput(
            loss=loss,
            aux_loss=aux_loss,
            logits=logits,
            cache=outputs.cache,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            router_logits=router_logits,
            lm_loss=lm_loss,
            quality_loss=q_loss,
            load_balancing_loss=lb_loss,
        )

    def _quality_loss_mask(self, quality_score, attention_mask, labels) -> torch.Tensor:
        """(B, T) bool: the tokens the quality loss averages over (never padding)."""
        batch, seq = quality_score.shape[:2]
        mask = torch.ones(batch, seq, dtype=torch.bool, device=quality_score.device)
        if attention_mask is not None and attention_mask.dim() == 2:
            mask = mask & attention_mask.bool().to(mask.device)
        if self.config.quality_loss_tokens == "assistant" and labels is not None:
            mask = mask & (labels != IGNORE_INDEX).to(mask.device)
        return mask
