"""The single-process decode loop: prompts in, text and per-token exit layers out.

Prefill runs every prompt token through every layer. Each decode step embeds the newest token of
every unfinished sequence, runs one :class:`LayerRange` over the whole model (where tokens exit
and leave the working group), reads logits from each token's exit hidden state, and samples.
Finished sequences leave the batch.

With ``deferred_fill`` (FREE's synchronized parallel decoding, Bae et al. 2023), a token that exits
gets no propagated K/V: its deeper layers run at full computation in the next step, in the same
layer calls as the next token, so every token attends to the K/V full-depth decoding would hold.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from sedac_ray.completion import Completion, eos_token_ids
from sedac_ray.draft_head import draft_reader, find_speculation
from sedac_ray.exit.probes import ExitProbes
from sedac_ray.exit.store import calibrated_default
from sedac_ray.exit_adapters import ExitAdapters, exit_logits
from sedac_ray.model.adapter import ModelAdapter
from sedac_ray.model.loading import LoadedModel
from sedac_ray.policy import ExitPolicy
from sedac_ray.runtime.layer_range import LayerRange, TokenRows
from sedac_ray.sampling import SamplingParams, choose_tokens
from sedac_ray.speculative import DEFAULT_DRAFT_LIMIT, SpeculativeDecoder, SpeculativeStats, check_draft_limit

Prompt = str | Sequence[dict]
log = logging.getLogger("sedac_ray.engine")
DEFERRED_FILL_IS_NOT_SPECULATIVE = (
    "deferred_fill does not apply to speculative mode: it verifies every token at full depth"
)


@dataclass
class GenerationResult:
    text: str
    token_ids: list[int]
    exit_layers: list[int]  # decoder layers executed to produce each generated token (1..L)
    finish_reason: str  # "stop" (EOS or a stop string) or "length"
    prompt_token_ids: list[int] = field(default_factory=list)
    num_layers: int = 0
    # Speculative mode only: acceptance statistics. There every token is verified at full depth;
    # exit_layers then holds the draft's exit layer for an accepted draft, L for a verified token.
    speculative: SpeculativeStats | None = None
    # Deferred fill only: layers run later for this sequence's exited tokens (computed, not saved).
    # Layers computed in all = sum(exit_layers) + deferred_layers.
    deferred_layers: int | None = None

    @property
    def mean_layers(self) -> float:
        return sum(self.exit_layers) / len(self.exit_layers) if self.exit_layers else float(self.num_layers)


class Engine:
    """``Engine(model, policy=None, adapters=None)``: ``model`` is a :class:`LoadedModel` from
    :func:`load_model`. Without a policy it uses the model's calibrated policy when a calibration
    file for its name, depth and dtype exists (``sedac calibrate``; :mod:`sedac_ray.exit.store`),
    else no exit (:data:`~sedac_ray.policy.DEFAULT_POLICY`); ``policy_source`` says which. Pass
    ``ExitPolicy.disabled()`` for plain full-depth decoding. ``adapters`` (an :class:`ExitAdapters`
    or its file) maps the hidden state of every token that exits before layer L before the head.

    ``speculative=True`` makes early exit lossless (:mod:`sedac_ray.speculative`): exited tokens
    are drafts, verified at full depth in batches of up to ``draft_limit`` per sequence, so the
    output equals full-depth decoding token for token. When the model has a speculation file
    (:func:`~sedac_ray.draft_head.find_speculation`), drafts are read out by its draft head, and
    ``Engine(model, speculative=True)`` without a policy or ``draft_limit`` uses the settings the
    cost model chose (:mod:`sedac_ray.cost_model`).

    ``deferred_fill=True`` gives exited tokens exact K/V instead of K/V propagated from their exit
    state: their deeper layers run in the next decode step beside the next token (see the module
    docstring). Tokens are still read out at their exit layer, but their deferred layers are
    computed (``GenerationResult.deferred_layers`` counts them): it buys agreement, not compute.
    Not with ``speculative``, which verifies every token at full depth anyway."""

    def __init__(
        self,
        model: LoadedModel,
        policy: ExitPolicy | None = None,
        speculative: bool = False,
        draft_limit: int | None = None,
        adapters: ExitAdapters | str | os.PathLike | None = None,
        probes: ExitProbes | str | os.PathLike | None = None,
        deferred_fill: bool = False,
    ):
        if speculative and deferred_fill:
            raise ValueError(DEFERRED_FILL_IS_NOT_SPECULATIVE)
        self.speculative = bool(speculative)
        self.deferred_fill = bool(deferred_fill)
        self.loaded = model
        self.tokenizer = model.tokenizer
        self.adapter = ModelAdapter(model.model)
        self.num_layers = self.adapter.num_layers
        calibration, source = calibrated_default(model.name, self.num_layers, self.adapter.dtype)
        speculation = find_speculation(model.name)
        settings = speculation.settings if speculation is not None else None
        if draft_limit is None:
            draft_limit = settings.draft_limit if settings is not None else DEFAULT_DRAFT_LIMIT
        self.draft_limit = check_draft_limit(draft_limit)
        if policy is None and self.speculative and settings is not None:
            rule = settings.exit_policy
            policy = ExitPolicy(**rule) if rule else ExitPolicy.disabled()
            self.policy_source = f"speculation settings {speculation.path}"
        elif policy is None:
            policy = calibration.policy if calibration is not None else ExitPolicy.disabled()
            self.policy_source = source
        else:
            self.policy_source = "given"
        self.policy = policy.validate_for(self.num_layers)
        if probes is None and calibration is not None and calibration.probes_path is not None:
            probes = calibration.probes_path  # the model's own probes serve any probe policy
        if probes is not None and not isinstance(probes, ExitProbes):
            probes = ExitProbes.load(probes)
        self.probes = probes
        if self.policy.uses_probe and probes is None:
            raise ValueError(
                f"policy {self.policy.describe()} needs exit probes: pass probes= or calibrate with probes"
            )
        if adapters is not None and not isinstance(adapters, ExitAdapters):
            adapters = ExitAdapters.load(adapters)
        if adapters is not None and adapters.num_layers != self.num_layers:
            raise ValueError(
                f"exit adapters are for {adapters.num_layers} layers; the model has {self.num_layers}"
            )
        self.exit_adapters = adapters.to(self.adapter.device) if adapters is not None else None
        # The same draft read-out as the pipeline's LM head and last stage (draft_reader).
        drafts = draft_reader(self.adapter, speculation, self.exit_adapters)
        self.draft_head = drafts.head if drafts is not None else None
        self.draft_confidence = drafts.confidence if drafts is not None else 0.0
        log.info("exit policy %s (%s)", self.policy.describe(), self.policy_source)
        self.eos_ids = eos_token_ids(
            [getattr(model.model, "generation_config", None), model.model.config], model.tokenizer
        )

    def exit_logits(self, hidden: torch.Tensor, exit_layers: torch.Tensor) -> torch.Tensor:
        """Logits of decode tokens that left the model after ``exit_layers`` layers (exit adapters
        included, when the engine has them)."""
        return exit_logits(self.adapter, hidden, exit_layers, self.exit_adapters)

    # ---- input handling -----------------------------------------------------------------

    def encode(self, prompt: Prompt, chat: bool) -> list[int]:
        if chat:
            messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
            if not messages or not any(str(m.get("content", "")).strip() for m in messages):
                raise ValueError("prompt is empty: give at least one message with content")
            ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=False)
        else:
            if not isinstance(prompt, str):
                raise ValueError("a non-chat prompt must be a string; pass chat=True for a list of messages")
            if not prompt:
                raise ValueError("prompt is empty")
            ids = self.tokenizer(prompt)["input_ids"]
        return [int(i) for i in ids]

    def _check_lengths(self, prompt_ids: list[list[int]], max_new_tokens: int) -> None:
        context = self.adapter.max_context
        for i, ids in enumerate(prompt_ids):
            if not ids:
                raise ValueError(f"prompt {i} is empty after tokenization")
            if len(ids) + max_new_tokens > context:
                raise ValueError(
                    f"prompt {i} has {len(ids)} tokens; with max_new_tokens={max_new_tokens} that exceeds "
                    f"the model's context of {context} tokens. Shorten the prompt or lower max_new_tokens."
                )

    # ---- generation ------------------------------------------------------------------------

    @torch.inference_mode()
    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        max_new_tokens: int = 64,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int | None = None,
        stop: Sequence[str] | None = None,
        chat: bool = False,
        policy: ExitPolicy | None = None,
        ignore_eos: bool = False,
        speculative: bool | None = None,
        deferred_fill: bool | None = None,
    ) -> list[GenerationResult]:
        """Generate for a batch of prompts (strings, or message lists with ``chat=True``).
        ``ignore_eos`` keeps generating past EOS (for benchmarks that need a fixed length);
        ``speculative`` and ``deferred_fill`` override the engine's settings for this call."""
        if isinstance(prompts, str) or (chat and prompts and isinstance(prompts[0], dict)):
            prompts = [prompts]
        if not prompts:
            raise ValueError("no prompts given")
        if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
        policy = self.policy if policy is None else policy.validate_for(self.num_layers)
        params = SamplingParams(temperature=temperature, top_p=top_p, seed=seed)
        stop = [s for s in (stop or []) if s]
        prompt_ids = [self.encode(p, chat) for p in prompts]
        self._check_lengths(prompt_ids, max_new_tokens)
        return self.generate_ids(
            prompt_ids, max_new_tokens, params, stop, policy, ignore_eos, speculative, deferred_fill
        )

    def generate_ids(
        self,
        prompt_ids: list[list[int]],
        max_new_tokens: int,
        params: SamplingParams,
        stop: list[str],
        policy: ExitPolicy,
        ignore_eos: bool = False,
        speculative: bool | None = None,
        deferred_fill: bool | None = None,
        layers: LayerRange | None = None,
    ) -> list[GenerationResult]:
        """:meth:`generate` on token ids. ``layers`` is the whole-model range to decode in (a
        fresh one by default; a test passes its own to read the K/V left behind)."""
        adapter = self.adapter
        device = adapter.device
        batch = len(prompt_ids)
        speculative = self.speculative if speculative is None else speculative
        deferred_fill = self.deferred_fill if deferred_fill is None else deferred_fill
        if speculative and deferred_fill:
            raise ValueError(DEFERRED_FILL_IS_NOT_SPECULATIVE)
        if layers is None:
            layers = LayerRange(adapter, 0, self.num_layers, probes=self.probes)
        slots = torch.tensor(layers.cache.allocate(batch))
        eos_ids = set() if ignore_eos else self.eos_ids
        completions = [Completion(self.tokenizer, max_new_tokens, eos_ids, stop) for _ in prompt_ids]

        # Prefill: right-padded prompts, full depth; each row's logits from its last real token.
        lengths = torch.tensor([len(ids) for ids in prompt_ids])
        width = int(lengths.max())
        padded = torch.tensor([ids + [ids[-1]] * (width - len(ids)) for ids in prompt_ids])
        positions = torch.arange(width).expand(batch, width)
        hidden = layers.prefill(slots, positions, adapter.embed_tokens(padded.to(device)))
        last = hidden[torch.arange(batch, device=device), (lengths - 1).to(device)]
        tokens = choose_tokens(adapter.logits(last), [params] * batch, (lengths - 1).tolist())
        for completion, token in zip(completions, tokens, strict=True):
            completion.add(token, self.num_layers)

        positions = lengths.clone()
        rules = policy.rules(batch)
        stats: list[SpeculativeStats | None] = [None] * batch
        if speculative:
            # Decodes every sequence to its end; the plain loop below then finds nothing to do.
            decoder = SpeculativeDecoder(
                layers,
                self.draft_limit,
                draft_logits=None if self.draft_head else self.exit_logits,
                draft_head=self.draft_head,
                confidence=self.draft_confidence,
            )
            stats = decoder.run(completions, slots, positions, params, rules)
        # Deferred fill: the rows that exited last step, to run on from their exit layer. A finished
        # sequence's row is dropped: no later token of it attends there.
        pending: TokenRows | None = None
        deferred_layers = [0] * batch
        while active := [i for i, c in enumerate(completions) if not c.finished]:
            index = torch.tensor(active)
            if pending is not None:
                pending = pending.select(torch.isin(pending.ids, index).nonzero()[:, 0])
                for row, layer in zip(pending.ids.tolist(), pending.exit_layer.tolist(), strict=True):
                    deferred_layers[row] += self.num_layers - layer
            inputs = torch.tensor([completions[i].token_ids[-1] for i in active], device=device)
            rows = TokenRows(
                ids=index,
                slots=slots[index],
                positions=positions[index],
                hidden=adapter.embed_tokens(inputs),
                rules=rules[index],
            )
            exited = layers.decode(rows, propagate=not deferred_fill, deferred=pending).exited
            if deferred_fill:
                pending = exited.select((exited.exit_layer < self.num_layers).nonzero()[:, 0])
            rows_out = exited.ids.tolist()
            tokens = choose_tokens(
                self.exit_logits(exited.hidden, exited.exit_layer),
                [params] * len(rows_out),
                positions[exited.ids].tolist(),
            )
            positions[index] += 1
            for row, token, layer in zip(rows_out, tokens, exited.exit_layer.tolist(), strict=True):
                completions[row].add(token, layer)
        return [
            GenerationResult(
                text=c.text,
                token_ids=c.token_ids,
                exit_layers=c.exit_layers,
                finish_reason=c.finish_reason,
                prompt_token_ids=ids,
                num_layers=self.num_layers,
                speculative=s,
                deferred_layers=d if deferred_fill else None,
            )
            for c, ids, s, d in zip(completions, prompt_ids, stats, deferred_layers, strict=True)
        ]
