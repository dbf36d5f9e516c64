"""What chat and completions prepare alike: the model, the output constraint, stop strings, the completion budget
and the sampling parameters, with every check a client must pass before its request is admitted."""

from __future__ import annotations

import json
from typing import Any

from microserve.engines.base import Guide, SamplingParams
from microserve.errors import InvalidRequest
from microserve.protocol.common import MAX_STOP_SEQUENCES, GuidedFields, SamplingFields
from microserve.protocol.peer_fields import refused_field
from microserve.services.limits import RequestLimits
from microserve.services.models import ModelTable, ServedModel


def stop_strings(stop: str | list[str] | None, limit: int = MAX_STOP_SEQUENCES) -> tuple[str, ...]:
    """The request's stop strings as a tuple; empty strings are dropped, more than ``limit`` is an error.

    OpenAI's own cap of four holds whatever the operator's limit: the stricter one wins.
    """
    if stop is None:
        return ()
    limit = min(limit, MAX_STOP_SEQUENCES)
    items = [stop] if isinstance(stop, str) else list(stop)
    if len(items) > limit:
        raise InvalidRequest(f"`stop` takes at most {limit} sequences, got {len(items)}", param="stop")
    return tuple(s for s in items if s)


def resolve_max_tokens(requested: int | None, prompt_tokens: int, context_length: int) -> int:
    """The completion budget: as requested if it fits the context, else a 400 that states both numbers."""
    room = context_length - prompt_tokens
    if requested is None:
        if room < 1:
            raise InvalidRequest(
                f"This model's maximum context length is {context_length} tokens, but the prompt has "
                f"{prompt_tokens} tokens, leaving no room for a completion.",
                param="messages",
                code="context_length_exceeded",
            )
        return room
    if prompt_tokens + requested > context_length:
        raise InvalidRequest(
            f"This model's maximum context length is {context_length} tokens, but {prompt_tokens} prompt "
            f"tokens plus {requested} completion tokens (max_tokens) were requested.",
            param="max_tokens",
            code="context_length_exceeded",
        )
    return requested


def logit_biases(bias: dict[str, float] | None, vocab_size: int | None) -> dict[int, float]:
    """Token id → additive bias; ids outside the vocabulary are a 400. A bias of -100 makes a token's
    probability vanish (e^-100 relative), which bans it without ever leaving a grammar with no allowed token."""
    out: dict[int, float] = {}
    for key, value in (bias or {}).items():
        token = int(key)
        if token < 0 or (vocab_size is not None and token >= vocab_size):
            raise InvalidRequest(
                f"logit_bias names token {token}, outside the vocabulary of {vocab_size} tokens", param="logit_bias"
            )
        out[token] = float(value)
    return out


def sampling_params(fields: SamplingFields, max_tokens: int, vocab_size: int | None = None) -> SamplingParams:
    """Engine sampling parameters from the request; unset fields take OpenAI's defaults, ``nvext`` extras apply."""
    nv = fields.nvext
    top_k = nv.top_k if nv is not None and nv.top_k is not None else fields.top_k
    repetition = nv.repetition_penalty if nv is not None and nv.repetition_penalty is not None else None
    ignore_eos = nv.ignore_eos if nv is not None and nv.ignore_eos is not None else fields.ignore_eos
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=1.0 if fields.temperature is None else fields.temperature,
        top_p=1.0 if fields.top_p is None else fields.top_p,
        top_k=max(top_k or 0, 0),
        min_p=fields.min_p or 0.0,
        seed=fields.seed,
        presence_penalty=fields.presence_penalty or 0.0,
        frequency_penalty=fields.frequency_penalty or 0.0,
        repetition_penalty=repetition or fields.repetition_penalty or 1.0,
        ignore_eos=ignore_eos,
        logit_bias=logit_biases(fields.logit_bias, vocab_size),
    )


def _schema_value(value: Any, param: str) -> Any:
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except (json.JSONDecodeError, RecursionError) as exc:
            raise InvalidRequest(f"`{param}` is not valid JSON: {exc}", param=param) from exc
    if not isinstance(value, dict):
        raise InvalidRequest(f"`{param}` must be a JSON schema object", param=param)
    return value


def guides_of(fields: GuidedFields, prefix: str = "") -> list[Guide]:
    """The guided-decoding constraints set in ``fields`` (top level or ``nvext``)."""
    guides = []
    if fields.guided_json is not None:
        param = f"{prefix}guided_json"
        guides.append(Guide("json", _schema_value(fields.guided_json, param), param))
    if fields.guided_regex is not None:
        guides.append(Guide("regex", fields.guided_regex, f"{prefix}guided_regex"))
    if fields.guided_choice is not None:
        guides.append(Guide("choice", list(fields.guided_choice), f"{prefix}guided_choice"))
    if fields.guided_grammar is not None:
        guides.append(Guide("grammar", fields.guided_grammar, f"{prefix}guided_grammar"))
    # llama-server's names
    if fields.grammar is not None:
        guides.append(Guide("grammar", fields.grammar, f"{prefix}grammar"))
    if fields.json_schema is not None:
        param = f"{prefix}json_schema"
        guides.append(Guide("json", _schema_value(fields.json_schema, param), param))
    # vLLM's structured outputs
    so = fields.structured_outputs
    if so is not None:
        at = f"{prefix}structured_outputs"
        if so.structural_tag is not None:
            raise InvalidRequest(f"`{at}.structural_tag` is not supported", param=f"{at}.structural_tag")
        if so.json_ is not None:
            guides.append(Guide("json", _schema_value(so.json_, f"{at}.json"), f"{at}.json"))
        if so.regex is not None:
            guides.append(Guide("regex", so.regex, f"{at}.regex"))
        if so.choice is not None:
            guides.append(Guide("choice", list(so.choice), f"{at}.choice"))
        if so.grammar is not None:
            guides.append(Guide("grammar", so.grammar, f"{at}.grammar"))
        if so.json_object:
            guides.append(Guide("json", {"type": "object"}, f"{at}.json_object"))
    return guides


def single_guide(guides: list[Guide]) -> Guide | None:
    """The one constraint of a request; several at once is a 400."""
    if len(guides) > 1:
        names = ", ".join(f"`{g.param}`" for g in guides)
        raise InvalidRequest(f"only one output constraint may be given, got {names}", param=guides[1].param)
    return guides[0] if guides else None


class GenerationService:
    """The preparation every text-generating route shares; chat and completions build on it."""

    def __init__(self, models: ModelTable, limits: RequestLimits | None = None) -> None:
        self._models = models
        self._limits = limits or RequestLimits()

    def text_model(self, name: str) -> ServedModel:
        """The text model called ``name``; a 404 naming the served ones when there is none."""
        return self._models.text(name)

    def _model(
        self, name: str, request: SamplingFields, *, messages: int | None = None, requested: int | None
    ) -> ServedModel:
        """The text model called ``name``, once the request is within the operator's limits."""
        refused = refused_field(request.model_extra)
        if refused is not None:
            field, value = refused
            raise InvalidRequest(
                f"`{field}` is not supported by this server and would change the output (got {value!r}); "
                "leave it out or set it to its neutral value",
                param=field,
                code="unsupported_parameter",
            )
        self._limits.check(request, messages=messages, requested_tokens=requested)
        return self._models.text(name)

    @staticmethod
    def _guide(request: SamplingFields, extra: Guide | None = None) -> Guide | None:
        """The one output constraint of the request: top level, ``nvext``, or ``extra`` (a response format)."""
        guides = guides_of(request)
        if request.nvext is not None:
            guides += guides_of(request.nvext, "nvext.")
        if extra is not None:
            guides.append(extra)
        return single_guide(guides)

    @staticmethod
    async def _checked(model: ServedModel, guide: Guide | None) -> Guide | None:
        """``guide`` once the model's engine has compiled it (a 400 naming its field if it cannot)."""
        if guide is not None:
            await model.text_engine.check_guide(guide)
        return guide

    def _budget(self, requested: int | None, prompt_tokens: int, context_length: int) -> int:
        """The completion budget: as requested (or the operator's default) if it fits the context, else a 400."""
        room = context_length - prompt_tokens
        if requested is None and room >= 1:
            requested = self._limits.default_max_tokens(room)
        return resolve_max_tokens(requested, prompt_tokens, context_length)

    def _stops(self, request: SamplingFields) -> tuple[str, ...]:
        return stop_strings(request.stop, self._limits.max_stop_sequences)
