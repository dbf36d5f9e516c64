"""Request fields of other OpenAI-compatible servers (llama-server, vLLM, OpenAI's own) that microserve does not
implement: those that would change the output are refused with a 400 naming them, unless they carry their
neutral value, and those that change nothing a client sees are accepted and ignored.

A client migrating from a peer must never lose a setting silently: a sampler microserve lacks (``mirostat``), a
constraint it cannot apply (``structural_tag``), a template override. Clients such as llama.cpp's web UI send
every sampler with its neutral value; those requests are served, since the neutral value changes nothing.
"""

from __future__ import annotations

from typing import Any

# Field -> the values that leave the output as microserve produces it (None is always neutral).
REFUSED: dict[str, tuple[Any, ...]] = {
    # llama-server samplers
    "mirostat": (0,),
    "typical_p": (1,),
    "tfs_z": (1,),
    "dynatemp_range": (0,),
    "dry_multiplier": (0,),
    "xtc_probability": (0,),
    "top_n_sigma": (-1,),
    "n_probs": (0,),
    "lora": ([],),
    # vLLM sampling extensions
    "use_beam_search": (False,),
    "length_penalty": (1,),
    "min_tokens": (0,),
    "bad_words": ([],),
    "stop_token_ids": ([],),
    "allowed_token_ids": (),
    "logits_processors": ([],),
    "include_stop_str_in_output": (False,),
    "prompt_logprobs": (),
    "return_tokens_as_token_ids": (False,),
    "truncate_prompt_tokens": (),
    # vLLM chat: how the prompt is rendered
    "echo": (False,),
    "add_generation_prompt": (True,),
    "continue_final_message": (False,),
    "chat_template": (),
    "chat_template_kwargs": ({},),
    "documents": ([],),
    # OpenAI chat: the deprecated function-calling fields, audio output, web search
    "functions": ([],),
    "function_call": ("none",),
    "modalities": (["text"],),
    "audio": (),
    "web_search_options": (),
}

# Accepted and ignored: they tune the peer's own machinery (caches, slots, timing, backends, reporting) or name
# what microserve always does. Listed in docs/generation.md.
IGNORED = frozenset(
    {
        "cache_prompt",
        "id_slot",
        "n_keep",
        "n_cmpl",
        "t_max_predict_ms",
        "t_max_prompt_ms",
        "timings_per_token",
        "return_progress",
        "samplers",
        "penalty_last_n",
        "penalize_nl",
        "dry_base",
        "dry_allowed_length",
        "dry_penalty_last_n",
        "dry_sequence_breakers",
        "xtc_threshold",
        "mirostat_tau",
        "mirostat_eta",
        "dynatemp_exponent",
        "min_keep",
        "skip_special_tokens",
        "spaces_between_special_tokens",
        "priority",
        "request_id",
        "metadata",
        "store",
        "service_tier",
        "prediction",
        "reasoning_effort",
        "prompt_cache_key",
        "safety_identifier",
        "verbosity",
    }
)


def refused_field(extra: dict[str, Any] | None) -> tuple[str, Any] | None:
    """The first field in ``extra`` (the request's unknown fields) that would change the output, with its value."""
    for name, value in (extra or {}).items():
        neutral = REFUSED.get(name)
        if neutral is None or value is None:
            continue
        if not any(_same(value, n) for n in neutral):
            return name, value
    return None


def _same(value: Any, neutral: Any) -> bool:
    # True == 1 in Python; a boolean matches only a boolean.
    if isinstance(value, bool) or isinstance(neutral, bool):
        return value is neutral
    return bool(value == neutral)
