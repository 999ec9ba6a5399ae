"""Row scores from gate outputs: the one score formula.

    layer_score[l] = mean over the row's scored tokens of g[l, t],   g = sigmoid(quality_score)
    score          = gate_weight x mean over layers of layer_score[l]
                     - perplexity_weight x NLL                          (when set)
                     + prompt_gain_weight x (NLL_without_prompt - NLL)  (when set)
                     + expert_effect_weight x (NLL_gates_shut - NLL)    (when set)
                     + driving_force_weight x mean over layers of D2[l]  (when set)
                     - redundancy_weight x max(reply_redundancy - redundancy_tolerance, 0)  (when set)
                     - commonness_weight x max(reply_commonness - commonness_tolerance, 0)  (when set)

Scored tokens are the assistant tokens (labels not ``IGNORE_INDEX``) by default, or every real token with
``scoring.tokens=all``; padding never counts. ``layer_scores`` are stored beside ``score`` so any
other aggregation (last layers only, weighted layers) can be recomputed without rescoring. (The
seed had two formulas; a later script averaged sigmoid(token-mean q) instead. This is the first.)
``NLL`` is the row's mean next-token NLL over the same tokens, from the same forward pass
(``row_nll``): ``scoring.perplexity_weight`` ranks rows the model finds implausible lower. With
``scoring.nll_model=base`` every NLL (and so the prompt gain and the expert effect) is measured with the
model stage 1 started from instead (``base_model_view``: its routers back, every gate open), in a pass of
its own: training the gates scales the experts' output and raised the NLL of a better-trained selector by
0.07-0.24 nats per token, unevenly across rows (benchmarks/README.md, "the NLL of the base model").
``NLL_without_prompt`` is the mean NLL of the same reply tokens with the prompts removed (a second,
reply-only pass): the prompt gain is how much the prompt helps predict the reply (per-token pointwise
mutual information; the inverse view of IFD), low for replies that do not answer their prompt.
``NLL_gates_shut`` is the NLL of the same tokens with every quality gate forced to 0 (only the trash
expert; a third pass): the expert effect is what the gated experts contribute to predicting the row,
a score built from what the gate controls rather than from the gate's raw value.
``D2`` is the original project's later "net driving force" of the gates, the expert effect's local,
second-order cousin: with every gate of layer l shifted by the same e over the row's real tokens,
``A[l]`` = dNLL/de / T and ``B[l]`` = d2NLL/de2 / T (T real tokens: the token means of the gradient and of
the Hessian along that direction; one forward and, by double backward, one backward per layer), and
``D2[l] = max(-(A + lambda), 0)^2 / (2 (tau + max(B + mu, 0) + kappa max(-(B + mu), 0)))``: the NLL a
Newton step opening the layer's gates would save, damped where the curvature is flat or negative.
``reply_redundancy`` needs no model: the larger of the share of the reply's token ``REDUNDANCY_NGRAM``-grams
that already occurred earlier in the reply and the share of the request's n-grams that the reply repeats.
A reply that loops or restates its request scores near 1 and is likelier to a language model than a real
answer (a stronger model copies better), so the likelihood terms cannot see it; most replies score near
0, and one that copies its answer out of the prompt (an option, a passage's span) low, since it repeats
little of the request; ``scoring.redundancy_tolerance`` is the share left unpenalised (benchmarks/README.md,
"Replies that add nothing" and "A corpus no key was chosen on").

With ``scoring.combine=robust_z`` each term (mean gate, NLL, prompt gain, expert effect) is replaced by
its robust z-score over the scored corpus, ``(term - median) / (IQR / 1.349)``, before it is weighted
(``term_scales``, measured on a seeded sample of the score files): raw terms have spreads that follow
the model and the corpus (a weak base's NLL spread was 0.79 where a good one's was 1.9), so a fixed
weight meant a different balance on each. With ``scoring.prompt_gain_cap=median`` the prompt gain term
is ``min(prompt gain, its median)`` (the median from the same sample; with robust_z, ``min(z, 0)``):
a high per-token gain marks short and cut-off replies as much as good ones, a low one marks replies
their prompt does not explain; ``lower_quartile`` caps it at its 25th percentile instead. Both, and
every weight, are applied when selecting (the config fields marked ``after_scoring``): the selection
recomputes each row's score from its stored terms, so a rerun with other weights scores nothing again
unless a weight turns a pass on; the score files' own ``score`` is the raw one under the weights
they were scored with.
"""

from __future__ import annotations

import contextlib
import hashlib
from dataclasses import dataclass, fields, replace

import numpy as np
import torch
from numpy.lib.stride_tricks import sliding_window_view

from selectmoe.config.loader import ConfigError
from selectmoe.data.collate import collate
from selectmoe.data.template import IGNORE_INDEX
from selectmoe.models.modeling import base_model_view, gates_forced, gates_shifted

SCORE_TOKENS = ("assistant", "all")
# D2's constants as the original project's design note gives them
DRIVING_FORCE_LAMBDA, DRIVING_FORCE_TAU, DRIVING_FORCE_KAPPA, DRIVING_FORCE_MU = 0.0, 1e-4, 10.0, 0.0
NLL_CHUNK = 1024  # scored positions per LM-head call in row_nll
REDUNDANCY_NGRAM = 4  # tokens per n-gram of reply_redundancy
COMMON_NGRAM = 8  # tokens per n-gram of reply_ngrams (and so of reply_commonness)
# reply_ngrams keeps the n-grams whose hash is 0 modulo NGRAM_SAMPLE_MODULUS (the same ones in every row), at
# most NGRAMS_PER_ROW of them, the smallest hashes
NGRAM_SAMPLE_MODULUS = 4
NGRAMS_PER_ROW = 64
SHARE_COLUMNS = ("reply_redundancy", "reply_ngrams")  # the columns of the share terms: never z-scored
COMMON_NGRAM_MIN_ROWS = 3  # an n-gram is common in at least this many sampled rows, whatever the share
_NGRAM_POWERS = np.array([pow(0x100000001B3, k, 2**64) for k in range(COMMON_NGRAM)], dtype=np.uint64)


# ---------------------------------------------------------------------------- what a score needs


@dataclass(frozen=True)
class ScorePasses:
    """Which columns ``score_batch`` computes, and so which forward passes it runs per batch.

    The decoder pass gives ``layer_scores`` (and ``routing``, ``nll``); ``reply_only`` adds a pass
    over the replies without their prompts (``nll_without_prompt``); ``gates_shut`` a pass with every
    quality gate forced to 0 (``nll_gates_shut``); ``gate_derivatives`` a forward and a double backward
    with respect to the gates (``gate_slope``, ``gate_curvature``, ``driving_force``)."""

    tokens: str = "assistant"
    gates: bool = True  # layer_scores; False for a model without quality gates (plain OLMoE/Llama)
    routing: bool = False
    embedding: bool = False
    nll: bool = False
    reply_only: bool = False
    gates_shut: bool = False
    gate_derivatives: bool = False
    nll_model: str = "stage1"  # "base": every NLL under base_model_view (scoring.nll_model)

    @classmethod
    def for_scoring(cls, scoring) -> ScorePasses:
        """The passes a ``scoring`` config section needs: a term's weight != 0 turns its pass on."""
        reply_only = scoring.prompt_gain or scoring.prompt_gain_weight != 0
        gates_shut = scoring.expert_effect or scoring.expert_effect_weight != 0
        gate_derivatives = scoring.driving_force or scoring.driving_force_weight != 0
        if reply_only and scoring.tokens != "assistant":
            raise ConfigError("scoring.prompt_gain needs scoring.tokens=assistant (it compares reply tokens)")
        if scoring.prompt_gain_cap != "none" and scoring.prompt_gain_weight == 0:
            raise ConfigError(
                f"scoring.prompt_gain_cap={scoring.prompt_gain_cap} needs scoring.prompt_gain_weight != 0"
            )
        for term in ("redundancy", "commonness"):
            tolerance = getattr(scoring, f"{term}_tolerance")
            if tolerance and not getattr(scoring, f"{term}_weight"):
                raise ConfigError(
                    f"scoring.{term}_tolerance={tolerance} needs scoring.{term}_weight != 0 "
                    "(to turn the term off, set both to 0)"
                )
        share = {f.name: f.default for f in fields(scoring)}["common_ngram_share"]
        if scoring.common_ngram_share != share and not scoring.commonness_weight:
            raise ConfigError(
                f"scoring.common_ngram_share={scoring.common_ngram_share} needs scoring.commonness_weight != 0"
            )
        nll = scoring.lm_loss or scoring.perplexity_weight != 0 or reply_only or gates_shut
        if scoring.nll_model != "stage1" and not nll:
            raise ConfigError(
                f"scoring.nll_model={scoring.nll_model} needs an NLL to measure (scoring.lm_loss, "
                "perplexity_weight, prompt_gain or expert_effect)"
            )
        return cls(
            tokens=scoring.tokens,
            routing=scoring.store_routing,
            embedding=scoring.store_embeddings,
            nll=nll,
            reply_only=reply_only,
            gates_shut=gates_shut,
            gate_derivatives=gate_derivatives,
            nll_model=scoring.nll_model,
        )

    @property
    def full_rows(self) -> bool:
        """Whether a pass over the full rows (prompt and reply) is needed."""
        return (
            self.gates
            or self.routing
            or self.embedding
            or self.nll
            or self.gates_shut
            or self.gate_derivatives
        )

    def reply_only_apart(self) -> tuple[ScorePasses, ScorePasses | None]:
        """The passes over the full rows, and the reply-only pass alone (``None`` without one): the
        scorer batches replies by their own length, since in batches cut by the full rows' length
        they were padded to the longest reply."""
        if not self.reply_only:
            return self, None
        reply_only = ScorePasses(tokens=self.tokens, gates=False, reply_only=True, nll_model=self.nll_model)
        return replace(self, reply_only=False), reply_only


def scores_depend_on(scoring) -> dict:
    """The fields of a ``scoring`` section that change what is computed (the resume key, beside the
    ``ScorePasses`` they imply): every field but those marked ``execution`` (batch sizes, actor counts,
    fault injection), ``after_scoring`` (the weights, tolerance, combine and cap: how the stored terms
    are combined) or ``pass_switch`` (``lm_loss``, ``prompt_gain``, ...: the passes say what they do,
    so ``prompt_gain=true`` and a prompt gain weight store the same files)."""
    skipped = ("execution", "after_scoring", "pass_switch")
    return {
        f.name: getattr(scoring, f.name) for f in fields(scoring) if not any(map(f.metadata.get, skipped))
    }


# ---------------------------------------------------------------------------- the scoring pass


@torch.inference_mode()
def score_batch(model, rows: list[dict], what: ScorePasses, pad_token_id: int) -> dict[str, np.ndarray]:
    """The one scoring forward pass: per-row columns for ``rows`` (tokenised: ``input_ids``,
    ``labels``, and ``reply_input_ids``/``reply_labels`` for ``reply_only``), in their order.

    Columns: ``n_scored_tokens``, ``reply_redundancy``, ``reply_ngrams`` and ``reply_hash`` (with a pass
    over the full rows); ``layer_scores`` (B, L) with ``what.gates``; ``routing`` (B, L*E); ``embedding``
    (B, hidden) fp16; ``nll``, ``nll_without_prompt``, ``nll_gates_shut`` (B,); ``gate_slope``, ``gate_curvature``,
    ``driving_force`` (B, L). The decoder runs without the LM head; only the scored positions go through
    it (``row_nll``)."""
    device = next(model.parameters()).device
    columns: dict[str, np.ndarray] = {}
    with _root_gathered(model):
        if what.full_rows:
            batch = collate(rows, pad_token_id, device)
            inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
            mask = score_mask(batch["attention_mask"], batch["labels"], what.tokens)
            columns["n_scored_tokens"] = mask.sum(dim=1).cpu().numpy().astype(np.int64)
            columns["reply_redundancy"] = np.asarray(
                [reply_redundancy(r["input_ids"], r["labels"]) for r in rows]
            )
            columns["reply_ngrams"] = np.stack([reply_ngrams(r["input_ids"], r["labels"]) for r in rows])
            eos = getattr(model.config, "eos_token_id", None)
            columns["reply_hash"] = np.asarray(
                [reply_hash(r["input_ids"], r["labels"], eos) for r in rows], np.uint64
            )
            nll_apart = what.nll and what.nll_model == "base"
            if what.gates or what.routing or what.embedding or (what.nll and not nll_apart):
                out = model.model(**inputs, output_router_logits=what.gates or what.routing)
                if what.gates:
                    quality = [r["quality_score"] for r in out.router_logits]
                    columns["layer_scores"] = layer_gate_means(quality, mask).cpu().numpy().astype(np.float64)
                if what.routing:
                    dists = layer_routing_means([r["moe_logits"] for r in out.router_logits], mask)
                    columns["routing"] = dists.reshape(len(rows), -1).cpu().numpy().astype(np.float32)
                if what.embedding:
                    pooled = pooled_hidden(out.last_hidden_state, batch["attention_mask"])
                    columns["embedding"] = pooled.cpu().numpy().astype(np.float16)
                if what.nll and not nll_apart:
                    columns["nll"] = _nll(model, out.last_hidden_state, batch["input_ids"], mask)
            if nll_apart:
                with _nll_model(model, what):
                    hidden = model.model(**inputs).last_hidden_state
                columns["nll"] = _nll(model, hidden, batch["input_ids"], mask)
            if what.gates_shut:
                with _nll_model(model, what), gates_forced(model, 0.0):
                    hidden = model.model(**inputs).last_hidden_state
                columns["nll_gates_shut"] = _nll(model, hidden, batch["input_ids"], mask)
            if what.gate_derivatives:
                slope, curvature = gate_derivatives(model, batch["input_ids"], batch["attention_mask"], mask)
                columns["gate_slope"], columns["gate_curvature"] = slope, curvature
                columns["driving_force"] = driving_force(slope, curvature)
        if what.reply_only:
            replies = [{"input_ids": r["reply_input_ids"], "labels": r["reply_labels"]} for r in rows]
            reply = collate(replies, pad_token_id, device)
            with _nll_model(model, what):
                hidden = model.model(
                    input_ids=reply["input_ids"], attention_mask=reply["attention_mask"]
                ).last_hidden_state
            reply_mask = score_mask(reply["attention_mask"], reply["labels"], "assistant")
            columns["nll_without_prompt"] = _nll(model, hidden, reply["input_ids"], reply_mask)
    return columns


def reply_redundancy(input_ids, labels) -> float:
    """How much of the reply adds nothing, the larger of two shares of token ``REDUNDANCY_NGRAM``-grams:
    of the reply's (those ending at an assistant token), those already earlier in the reply (a loop, a
    reply twice, a repeated phrase); of the request's (those of prompt tokens only), those the reply
    repeats (the request restated). A reply that copies its answer out of the prompt (one option of a
    multiple-choice question, a span of a passage) repeats a small share of the request. The request's
    n-grams include the chat template's role headers, so a short request restated word for word scores
    below 1 (with the tiny test tokenizer 0.56 for a 14-token request, and not over the default's
    tolerance of 0.4 for one of 9 tokens or fewer). With several turns the reply is every token the row trains on (every assistant turn) and
    the request every other token. 0 for a reply too short to have an n-gram."""
    n, ids = REDUNDANCY_NGRAM, [int(i) for i in input_ids]
    in_reply = [label != IGNORE_INDEX for label in labels]
    request: set[tuple[int, ...]] = set()
    reply: set[tuple[int, ...]] = set()
    repeated = total = 0
    for end in range(n - 1, len(ids)):
        gram = tuple(ids[end - n + 1 : end + 1])
        if in_reply[end]:
            total += 1
            repeated += gram in reply
            reply.add(gram)
        elif not any(in_reply[end - n + 1 : end + 1]):
            request.add(gram)
    if not total:
        return 0.0
    return max(repeated / total, len(request & reply) / len(request) if request else 0.0)


def reply_ngrams(input_ids, labels) -> np.ndarray:
    """(NGRAMS_PER_ROW,) uint32: the hashes of a consistent sample of the reply's distinct token
    ``COMMON_NGRAM``-grams (those of assistant tokens only), ascending, 0 after the last: the n-grams whose
    64-bit hash is 0 modulo ``NGRAM_SAMPLE_MODULUS``, at most ``NGRAMS_PER_ROW`` of them. An n-gram sampled
    in one row is sampled in every row that holds it, so a sample of rows counts how many rows share it
    (``common_ngrams``) without storing every n-gram; a reply past ~260 tokens keeps only its 64 smallest,
    so there the count misses its n-grams of larger hashes (its own share is still measured on an unbiased
    sample). A reply under 8 tokens has none, and a short one may have none sampled (each n-gram is, with
    chance 1/4): its commonness is then 0."""
    row = np.zeros(NGRAMS_PER_ROW, dtype=np.uint32)
    ids = np.asarray(input_ids, dtype=np.uint64)
    if len(ids) < COMMON_NGRAM:
        return row
    reply = sliding_window_view(np.asarray(labels) != IGNORE_INDEX, COMMON_NGRAM).all(axis=1)
    hashes = _mixed(sliding_window_view(ids, COMMON_NGRAM)[reply] @ _NGRAM_POWERS)
    hashes = hashes[hashes % NGRAM_SAMPLE_MODULUS == 0]
    kept = np.unique(np.maximum(hashes >> np.uint64(32), 1).astype(np.uint32))[:NGRAMS_PER_ROW]  # 0: none
    row[: len(kept)] = kept
    return row


def reply_hash(input_ids, labels, eos_token_id=None) -> int:
    """A 64-bit hash of the reply's token ids (the assistant tokens, in order): rows that give the same
    reply share it (``selection.strata=reply`` finds a dataset's frequent replies by it). A reply that
    does not end in ``eos_token_id`` was cut by truncation: it is hashed with its prompt, so that short
    cut-off replies ("Sure", "1.") never pass for a frequent answer."""
    ids = np.asarray(input_ids, dtype="<i4")
    reply = ids[np.asarray(labels) != IGNORE_INDEX]
    eos = {eos_token_id} if isinstance(eos_token_id, int) else set(eos_token_id or ())
    whole = not eos or (len(reply) > 0 and int(reply[-1]) in eos)
    return int.from_bytes(
        hashlib.blake2b((reply if whole else ids).tobytes(), digest_size=8).digest(), "little"
    )


def _mixed(hashes: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: every bit of the n-gram's polynomial hash reaches every bit of the result."""
    hashes = hashes ^ (hashes >> np.uint64(30))
    hashes = hashes * np.uint64(0xBF58476D1CE4E5B9)
    hashes = hashes ^ (hashes >> np.uint64(27))
    hashes = hashes * np.uint64(0x94D049BB133111EB)
    return hashes ^ (hashes >> np.uint64(31))


def common_ngrams(ngrams: np.ndarray, min_share: float) -> np.ndarray:
    """uint32, sorted: the ``reply_ngrams`` hashes (rows of ``ngrams``: a sample of the corpus) that at
    least ``min_share`` of the rows hold, and at least ``COMMON_NGRAM_MIN_ROWS`` of them."""
    values, counts = np.unique(ngrams[ngrams != 0], return_counts=True)
    return values[counts >= max(min_share * len(ngrams), COMMON_NGRAM_MIN_ROWS)]


def reply_commonness(ngrams: np.ndarray, common: np.ndarray) -> np.ndarray:
    """(B,): per row of ``ngrams`` (``reply_ngrams``), the share of its sampled n-grams that are ``common``
    (text many rows share: a canned reply, a disclaimer, a closing formula); 0 for a reply with none."""
    ngrams = np.asarray(ngrams, dtype=np.uint32).reshape(-1, NGRAMS_PER_ROW)  # an empty batch: (0, 0)
    sampled = ngrams != 0
    shared = np.isin(ngrams, common) & sampled
    return shared.sum(axis=1) / np.maximum(sampled.sum(axis=1), 1)


def gate_derivatives(
    model, input_ids: torch.Tensor, attention_mask: torch.Tensor, mask: torch.Tensor
) -> tuple[np.ndarray, np.ndarray]:
    """(B, L) each: ``A`` and ``B`` of ``D2`` (module docstring), the first and second derivative of each
    row's NLL over ``mask`` with respect to one shift of layer l's gates at every real token, per real
    token. Rows are independent, so one backward of the summed NLL gives every row's derivative, and one
    more per layer its curvature. Attention runs on the math kernel: the fused CPU/GPU kernels have no
    double backward."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    n_layers = len(model.model.layers)
    with torch.inference_mode(False), torch.enable_grad(), sdpa_kernel(SDPBackend.MATH):
        input_ids, attention_mask, mask = input_ids.clone(), attention_mask.clone(), mask.clone()
        real = attention_mask[..., None].float()
        shift = torch.zeros(len(input_ids), n_layers, device=input_ids.device, requires_grad=True)
        with gates_shifted(model, [shift[:, layer, None, None] * real for layer in range(n_layers)]):
            hidden = model.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        nll = row_nll(model, hidden, input_ids, mask)
        (slope,) = torch.autograd.grad(nll.sum(), shift, create_graph=True)
        curvature = torch.stack(
            [
                torch.autograd.grad(slope[:, layer].sum(), shift, retain_graph=layer < n_layers - 1)[0][
                    :, layer
                ]
                for layer in range(n_layers)
            ],
            dim=1,
        )
        tokens = real.sum(dim=(1, 2))[:, None].clamp(min=1)
        return (
            (slope.detach() / tokens).cpu().numpy().astype(np.float64),
            (curvature / tokens).cpu().numpy().astype(np.float64),
        )


def driving_force(slope: np.ndarray, curvature: np.ndarray) -> np.ndarray:
    """``D2`` per layer from ``A`` (``slope``) and ``B`` (``curvature``): module docstring."""
    push = np.maximum(-(slope + DRIVING_FORCE_LAMBDA), 0.0) ** 2
    bent = curvature + DRIVING_FORCE_MU
    return push / (
        2 * (DRIVING_FORCE_TAU + np.maximum(bent, 0.0) + DRIVING_FORCE_KAPPA * np.maximum(-bent, 0.0))
    )


def _nll_model(model, what: ScorePasses):
    """The model an NLL is measured with (``what.nll_model``): the stage-1 model as loaded, or its base."""
    return base_model_view(model) if what.nll_model == "base" else contextlib.nullcontext()


def _nll(model, hidden: torch.Tensor, input_ids: torch.Tensor, mask: torch.Tensor) -> np.ndarray:
    return row_nll(model, hidden, input_ids, mask).cpu().numpy().astype(np.float64)


@contextlib.contextmanager
def _root_gathered(model):
    """Under FSDP2 the decoder is called directly, so the root's own parameters (embeddings, final
    norm, LM head) are gathered here first; every rank runs this together."""
    from torch.distributed.fsdp import FSDPModule

    if not isinstance(model, FSDPModule):
        yield
        return
    model.unshard()
    try:
        yield
    finally:
        model.reshard()


# ---------------------------------------------------------------------------- the formula


def score_mask(attention_mask: torch.Tensor, labels: torch.Tensor, tokens: str) -> torch.Tensor:
    """(B, T) bool: the tokens a row's score averages over."""
    if tokens not in SCORE_TOKENS:
        raise ValueError(f"scoring.tokens must be one of {SCORE_TOKENS}, got {tokens!r}")
    mask = attention_mask.bool()
    if tokens == "assistant":
        mask = mask & (labels != IGNORE_INDEX)
    return mask


def layer_gate_means(quality_scores: list[torch.Tensor], mask: torch.Tensor) -> torch.Tensor:
    """(B, L): per layer, the mean gate value over each row's masked tokens."""
    gates = torch.sigmoid(torch.stack([q[..., 0].float() for q in quality_scores], dim=-1))  # (B, T, L)
    weights = mask.unsqueeze(-1).float()
    return (gates * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1)


def layer_routing_means(moe_logits: list[torch.Tensor], mask: torch.Tensor) -> torch.Tensor:
    """(B, L, E): per layer, the mean routing distribution over each row's masked tokens."""
    batch, seq = mask.shape
    probs = torch.stack([torch.softmax(x.float(), dim=-1).view(batch, seq, -1) for x in moe_logits], dim=2)
    weights = mask.float()[..., None, None]  # (B, T, 1, 1)
    return (probs * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1)


def pooled_hidden(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, H) fp32: each row's position-weighted mean of the decoder's last hidden state over all its
    real tokens (weight t at position t, 1-based: later tokens have read more of the row), the row
    representation of RDS+ (Ivison et al. 2025). Prompt tokens count: a target task is told by its
    questions more than by its (often one-token) answers."""
    weights = attention_mask.float() * torch.arange(1, attention_mask.shape[1] + 1, device=hidden.device)
    weights = weights / weights.sum(dim=1, keepdim=True).clamp(min=1)
    return torch.einsum("bt,bth->bh", weights, hidden.float())


def row_score(
    layer_scores: np.ndarray,
    nll: np.ndarray | None = None,
    perplexity_weight: float = 0.0,
    nll_without_prompt: np.ndarray | None = None,
    prompt_gain_weight: float = 0.0,
    nll_gates_shut: np.ndarray | None = None,
    expert_effect_weight: float = 0.0,
    scales: dict[str, dict[str, float]] | None = None,
    gate_weight: float = 1.0,
    driving_force: np.ndarray | None = None,
    driving_force_weight: float = 0.0,
    prompt_gain_cap: float | None = None,
    reply_redundancy: np.ndarray | None = None,
    redundancy_weight: float = 0.0,
    redundancy_tolerance: float = 0.0,
    reply_commonness: np.ndarray | None = None,
    commonness_weight: float = 0.0,
    commonness_tolerance: float = 0.0,
) -> np.ndarray:
    """(B, L) -> (B,): ``gate_weight`` x the mean over layers, with the NLL, prompt-gain, expert-effect,
    driving-force, redundancy and commonness (each beyond its tolerance) terms when their weights are set;
    the prompt gain capped at ``prompt_gain_cap`` (nats) when given; with ``scales`` (``term_scales``) every
    term but the redundancy and the commonness (shares, the same on any model) is a robust z-score first."""
    terms = score_terms(layer_scores, nll, nll_without_prompt, nll_gates_shut, driving_force)
    if prompt_gain_cap is not None and "prompt_gain" in terms:
        terms["prompt_gain"] = np.minimum(terms["prompt_gain"], prompt_gain_cap)
    if scales is not None:
        terms = {
            name: (values - scales[name]["median"]) / scales[name]["scale"] for name, values in terms.items()
        }
    score = gate_weight * terms["gate"]
    for name, weight in (
        ("nll", -perplexity_weight),
        ("prompt_gain", prompt_gain_weight),
        ("expert_effect", expert_effect_weight),
        ("driving_force", driving_force_weight),
    ):
        if weight:
            score = score + weight * terms[name]
    for name, share, weight, tolerance in (
        ("reply_redundancy", reply_redundancy, redundancy_weight, redundancy_tolerance),
        ("reply_commonness", reply_commonness, commonness_weight, commonness_tolerance),
    ):
        if weight:
            if share is None:
                raise KeyError(f"{name}: its weight is set but the column is missing")
            score = score - weight * np.maximum(np.asarray(share, dtype=np.float64) - tolerance, 0.0)
    return score


def score_terms(
    layer_scores: np.ndarray,
    nll: np.ndarray | None = None,
    nll_without_prompt: np.ndarray | None = None,
    nll_gates_shut: np.ndarray | None = None,
    driving_force: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """The row score's terms that the given columns allow: ``gate`` (mean over layers), ``nll``,
    ``prompt_gain`` (NLL without the prompt - NLL), ``expert_effect`` (NLL with the gates shut - NLL),
    ``driving_force`` (D2, mean over layers)."""
    terms = {"gate": np.asarray(layer_scores, dtype=np.float64).mean(axis=-1)}
    if driving_force is not None:
        terms["driving_force"] = np.asarray(driving_force, dtype=np.float64).mean(axis=-1)
    if nll is not None:
        terms["nll"] = np.asarray(nll, dtype=np.float64)
        if nll_without_prompt is not None:
            terms["prompt_gain"] = np.asarray(nll_without_prompt, dtype=np.float64) - terms["nll"]
        if nll_gates_shut is not None:
            terms["expert_effect"] = np.asarray(nll_gates_shut, dtype=np.float64) - terms["nll"]
    return terms


def term_scales(terms: dict[str, np.ndarray]) -> dict[str, dict[str, float]]:
    """Per term, the median, the lower quartile and the robust spread IQR / 1.349 (the standard deviation
    for normal data) of ``terms`` (a sample of the scored rows); a term without spread keeps the scale 1."""
    scales = {}
    for name, values in terms.items():
        values = values[np.isfinite(values)]
        if values.size == 0:
            scales[name] = {"median": 0.0, "scale": 1.0, "lower_quartile": 0.0}
            continue
        q25, median, q75 = np.percentile(values, [25, 50, 75])
        spread = (q75 - q25) / 1.349
        scale = float(spread) if spread > 0 else 1.0
        scales[name] = {"median": float(median), "scale": scale, "lower_quartile": float(q25)}
    return scales


def score_columns(scoring) -> list[str]:
    """The stored columns the row score under ``scoring`` reads."""
    needed = ["layer_scores"]
    if scoring.perplexity_weight or scoring.prompt_gain_weight or scoring.expert_effect_weight:
        needed.append("nll")
    if scoring.prompt_gain_weight:
        needed.append("nll_without_prompt")
    if scoring.expert_effect_weight:
        needed.append("nll_gates_shut")
    if scoring.driving_force_weight:
        needed.append("driving_force")
    if scoring.redundancy_weight:
        needed.append("reply_redundancy")
    if scoring.commonness_weight:
        needed.append("reply_ngrams")
    return needed


def score_of(
    columns: dict,
    scoring,
    scales: dict[str, dict[str, float]] | None = None,
    common: np.ndarray | None = None,
) -> np.ndarray:
    """``row_score`` of ``score_batch``'s (or stored score files') columns under a ``scoring`` config
    (``scales``: the corpus's term scales, ``term_scales``; used for ``scoring.combine=robust_z`` and
    ``scoring.prompt_gain_cap``, and without them neither applies: the stored raw score; ``common``: the
    corpus's ``common_ngrams``, which ``scoring.commonness_weight`` needs)."""
    if scoring.commonness_weight and common is None:
        raise ValueError("scoring.commonness_weight needs the corpus's common n-grams (common_ngrams)")
    commonness = reply_commonness(columns["reply_ngrams"], common) if scoring.commonness_weight else None
    capped = scales is not None and scoring.prompt_gain_cap != "none" and "prompt_gain" in scales
    return row_score(
        columns["layer_scores"],
        columns.get("nll"),
        scoring.perplexity_weight,
        columns.get("nll_without_prompt"),
        scoring.prompt_gain_weight,
        columns.get("nll_gates_shut"),
        scoring.expert_effect_weight,
        scales if scoring.combine == "robust_z" else None,
        scoring.gate_weight,
        columns.get("driving_force"),
        scoring.driving_force_weight,
        scales["prompt_gain"][scoring.prompt_gain_cap] if capped else None,
        columns.get("reply_redundancy"),
        scoring.redundancy_weight,
        scoring.redundancy_tolerance,
        commonness,
        scoring.commonness_weight,
        scoring.commonness_tolerance,
    )


def score_formula(scoring) -> str:
    """``row_score`` under a ``scoring`` config, in words (axis labels, reports, manifests)."""
    z = (lambda term: f"z({term})") if scoring.combine == "robust_z" else (lambda term: term)
    gates = z("mean gate" + (" over all tokens" if scoring.tokens == "all" else ""))
    weighted = (
        [(scoring.gate_weight, gates)]
        + [
            (weight, z(name))
            for weight, name in (
                (-scoring.perplexity_weight, "NLL"),
                (
                    scoring.prompt_gain_weight,
                    "prompt gain"
                    if scoring.prompt_gain_cap == "none"
                    else f"min(prompt gain, its {scoring.prompt_gain_cap.replace('_', ' ')})",
                ),
                (scoring.expert_effect_weight, "expert effect"),
                (scoring.driving_force_weight, "driving force D2"),
            )
        ]
        + [
            (
                -getattr(scoring, f"{term}_weight"),
                f"max(reply {term} - {getattr(scoring, f'{term}_tolerance'):g}, 0)"
                if getattr(scoring, f"{term}_tolerance")
                else f"reply {term}",
            )
            for term in ("redundancy", "commonness")
        ]
    )
    terms = []
    for weight, name in ((w, n) for w, n in weighted if w):
        body = name if abs(weight) == 1 and name == gates else f"{abs(weight):g} x {name}"
        sign = "-" if weight < 0 else "+"
        terms.append(f"{sign} {body}" if terms else ("-" if weight < 0 else "") + body)
    formula = " ".join(terms) or "0"
    nll_terms = scoring.perplexity_weight or scoring.prompt_gain_weight or scoring.expert_effect_weight
    return f"{formula} (NLLs of the base model)" if nll_terms and scoring.nll_model == "base" else formula


def row_score_tensor(quality_scores: list[torch.Tensor], mask: torch.Tensor) -> torch.Tensor:
    """(B,): the row score as a differentiable tensor (stage 1 trains it against a reference set)."""
    return layer_gate_means(quality_scores, mask).mean(dim=-1)


def row_nll(model, hidden: torch.Tensor, input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B,): mean next-token NLL over each row's masked tokens, from the decoder's last hidden state.

    Only the positions that predict a masked token go through the LM head, ``NLL_CHUNK`` at a time, so
    neither (B, T, vocab) logits nor fp32 logits of every scored token exist at once (at OLMoE's
    vocabulary a batch of 8k scored tokens would hold 1.6 GB of them). A baseline and an optional score
    term (``scoring.lm_loss``)."""
    targets = mask[:, 1:]  # token t+1 is predicted at position t
    rows = torch.nonzero(targets, as_tuple=True)[0]
    states, labels = hidden[:, :-1][targets], input_ids[:, 1:][targets]
    nll = torch.cat(
        [
            torch.nn.functional.cross_entropy(
                model.lm_head(states[i : i + NLL_CHUNK]).float(), labels[i : i + NLL_CHUNK], reduction="none"
            )
            for i in range(0, len(labels), NLL_CHUNK)
        ]
        or [torch.zeros(0, device=hidden.device)]
    )
    total = torch.zeros(mask.shape[0], device=nll.device).index_add_(0, rows, nll)
    count = torch.zeros(mask.shape[0], device=nll.device).index_add_(0, rows, torch.ones_like(nll))
    return total / count.clamp(min=1)
