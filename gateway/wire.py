"""The shapes of OpenAI chat and embeddings requests, checked before anything runs.

What is accepted follows OpenAI's own API reference for the Chat Completions
endpoint, strictly on types: a value the gateway (token counting, context
fitting, the response cache) or an upstream would trip over is refused here
with a sentence and the ``param`` path of the value, never later with a 500.

- Roles: system, developer, user, assistant, tool, function.
- Content: a string; ``null`` only for an assistant turn (tool calls) or a
  function result; or a non-empty list of typed parts, by role:
  user: text, image_url, input_audio, file; assistant: text, refusal;
  system, developer and tool: text. Other part types are refused, as OpenAI does.
- ``name``, ids and function names: non-empty strings of at most 256 chars.
- ``tool_calls``: a list of {id, type: "function", function: {name, arguments}}
  with string values; ``tool_call_id`` a string (required for a tool result).
- Sampling parameters: numbers in OpenAI's ranges; booleans are not numbers.

An embeddings request (`check_embedding_input`, `check_embedding_params`)
passes on only ``input``, ``encoding_format``, ``dimensions`` and ``user``.

Parameters not listed here pass upstream as they are; `gateway.inbound`
has already refused NUL, lone surrogates, non-finite numbers and deep nesting
anywhere in the body.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from gateway.inbound import InboundError

ROLES = frozenset({"system", "developer", "user", "assistant", "tool", "function"})
PART_TYPES: dict[str, frozenset[str]] = {
    "system": frozenset({"text"}),
    "developer": frozenset({"text"}),
    "user": frozenset({"text", "image_url", "input_audio", "file"}),
    "assistant": frozenset({"text", "refusal"}),
    "tool": frozenset({"text"}),
    "function": frozenset({"text"}),
}
IMAGE_DETAILS = frozenset({"auto", "low", "high"})
AUDIO_FORMATS = frozenset({"wav", "mp3"})
# Names, ids and model names: OpenAI's own are far shorter; text content is
# bounded by the body size (DATA_UPLOAD_MAX_MEMORY_SIZE) instead.
MAX_NAME_CHARS = 256
MAX_STOP_SEQUENCES = 4
MAX_TOKENS_LIMIT = 2**31 - 1
MAX_SEED = 2**63 - 1

# name -> (low, high) for number parameters; integers are accepted as numbers.
_NUMBER_RANGES: dict[str, tuple[float, float]] = {
    "temperature": (0.0, 2.0),
    "top_p": (0.0, 1.0),
    "presence_penalty": (-2.0, 2.0),
    "frequency_penalty": (-2.0, 2.0),
}
_BOOL_PARAMS = ("stream", "logprobs", "parallel_tool_calls", "store")


def _fail(message: str, path: str) -> InboundError:
    return InboundError(message, path)


def _is_int(value: Any) -> bool:
    # bool is an int in Python; true is not a number of tokens.
    return isinstance(value, int) and not isinstance(value, bool)


def _string(
    value: Any, path: str, *, max_chars: int | None = None, empty: bool = True
) -> str:
    if not isinstance(value, str):
        raise _fail(f"'{path}' must be a string.", path)
    if not empty and not value.strip():
        raise _fail(f"'{path}' must not be empty.", path)
    if max_chars is not None and len(value) > max_chars:
        raise _fail(f"'{path}' must be at most {max_chars} characters.", path)
    return value


def _object(value: Any, path: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise _fail(f"'{path}' must be an object.", path)
    return value


def check_model(value: Any) -> str:
    """The model name, a non-empty bounded string."""
    return _string(value, "model", max_chars=MAX_NAME_CHARS, empty=False)


def check_messages(value: Any) -> list[dict[str, Any]]:
    """The messages list, every message and part checked."""
    if not isinstance(value, list) or not value:
        raise _fail("'messages' must be a non-empty list.", "messages")
    for index, message in enumerate(value):
        _check_message(message, f"messages[{index}]")
    return value


def _check_message(message: Any, where: str) -> None:
    message = _object(message, where)
    role = message.get("role")
    if role not in ROLES:
        raise _fail(
            f"'{where}.role' must be one of {', '.join(sorted(ROLES))}.",
            f"{where}.role",
        )
    if "name" in message and message["name"] is not None:
        _string(message["name"], f"{where}.name", max_chars=MAX_NAME_CHARS)
    content = message.get("content")
    if content is None:
        # An assistant turn may only call tools; a function result may be empty.
        if role not in ("assistant", "function"):
            raise _fail(
                f"'{where}.content' must be a string or a list of parts.",
                f"{where}.content",
            )
    elif isinstance(content, list):
        _check_parts(content, role, f"{where}.content")
    elif not isinstance(content, str):
        raise _fail(
            f"'{where}.content' must be a string or a list of parts.",
            f"{where}.content",
        )
    if role == "assistant":
        _check_assistant(message, where)
    elif role == "tool":
        _string(
            message.get("tool_call_id"),
            f"{where}.tool_call_id",
            max_chars=MAX_NAME_CHARS,
            empty=False,
        )
    elif role == "function":
        _string(
            message.get("name"), f"{where}.name", max_chars=MAX_NAME_CHARS, empty=False
        )


def _check_parts(parts: list[Any], role: str, where: str) -> None:
    if not parts:
        raise _fail(f"'{where}' must not be an empty list.", where)
    allowed = PART_TYPES[role]
    for index, part in enumerate(parts):
        path = f"{where}[{index}]"
        part = _object(part, path)
        kind = part.get("type")
        if kind not in allowed:
            raise _fail(
                f"'{path}.type' must be one of {', '.join(sorted(allowed))} "
                f"in a {role} message.",
                f"{path}.type",
            )
        if kind == "text":
            _string(part.get("text"), f"{path}.text")
        elif kind == "refusal":
            _string(part.get("refusal"), f"{path}.refusal")
        elif kind == "image_url":
            image = _object(part.get("image_url"), f"{path}.image_url")
            _string(image.get("url"), f"{path}.image_url.url", empty=False)
            detail = image.get("detail")
            if detail is not None and detail not in IMAGE_DETAILS:
                raise _fail(
                    f"'{path}.image_url.detail' must be one of "
                    f"{', '.join(sorted(IMAGE_DETAILS))}.",
                    f"{path}.image_url.detail",
                )
        elif kind == "input_audio":
            audio = _object(part.get("input_audio"), f"{path}.input_audio")
            _string(audio.get("data"), f"{path}.input_audio.data", empty=False)
            if audio.get("format") not in AUDIO_FORMATS:
                raise _fail(
                    f"'{path}.input_audio.format' must be one of "
                    f"{', '.join(sorted(AUDIO_FORMATS))}.",
                    f"{path}.input_audio.format",
                )
        else:  # file
            file = _object(part.get("file"), f"{path}.file")
            for key in ("file_data", "file_id", "filename"):
                if file.get(key) is not None:
                    _string(file[key], f"{path}.file.{key}")
            if file.get("file_data") is None and file.get("file_id") is None:
                raise _fail(
                    f"'{path}.file' needs a file_data or a file_id.", f"{path}.file"
                )


def _check_assistant(message: Mapping[str, Any], where: str) -> None:
    refusal = message.get("refusal")
    if refusal is not None:
        _string(refusal, f"{where}.refusal")
    calls = message.get("tool_calls")
    if calls is not None:
        if not isinstance(calls, list):
            raise _fail(f"'{where}.tool_calls' must be a list.", f"{where}.tool_calls")
        for index, call in enumerate(calls):
            path = f"{where}.tool_calls[{index}]"
            call = _object(call, path)
            _string(call.get("id"), f"{path}.id", max_chars=MAX_NAME_CHARS, empty=False)
            if call.get("type") != "function":
                raise _fail(f"'{path}.type' must be 'function'.", f"{path}.type")
            _check_function(call.get("function"), f"{path}.function")
    function_call = message.get("function_call")
    if function_call is not None:
        _check_function(function_call, f"{where}.function_call")
    audio = message.get("audio")
    if audio is not None:
        audio = _object(audio, f"{where}.audio")
        _string(audio.get("id"), f"{where}.audio.id", empty=False)


def _check_function(value: Any, where: str) -> None:
    function = _object(value, where)
    _string(
        function.get("name"), f"{where}.name", max_chars=MAX_NAME_CHARS, empty=False
    )
    _string(function.get("arguments"), f"{where}.arguments")


def check_params(data: Mapping[str, Any]) -> None:
    """The request's other parameters that have a type the gateway relies on."""
    for name in _BOOL_PARAMS:
        value = data.get(name)
        if value is not None and not isinstance(value, bool):
            raise _fail(f"'{name}' must be true or false.", name)
    for name, (low, high) in _NUMBER_RANGES.items():
        value = data.get(name)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise _fail(f"'{name}' must be a number.", name)
        if not low <= value <= high:
            raise _fail(f"'{name}' must be between {low:g} and {high:g}.", name)
    for name in ("max_tokens", "max_completion_tokens"):
        value = data.get(name)
        if value is not None and (
            not _is_int(value) or not 1 <= value <= MAX_TOKENS_LIMIT
        ):
            raise _fail(f"'{name}' must be a positive integer.", name)
    n = data.get("n")
    if n is not None and (not _is_int(n) or n != 1):
        raise _fail("Only n=1 is supported.", "n")
    seed = data.get("seed")
    if seed is not None and (not _is_int(seed) or abs(seed) > MAX_SEED):
        raise _fail("'seed' must be a 64-bit integer.", "seed")
    top_logprobs = data.get("top_logprobs")
    if top_logprobs is not None and (
        not _is_int(top_logprobs) or not 0 <= top_logprobs <= 20
    ):
        raise _fail("'top_logprobs' must be an integer from 0 to 20.", "top_logprobs")
    if top_logprobs is not None and data.get("logprobs") is not True:
        raise _fail("'top_logprobs' needs 'logprobs' set to true.", "top_logprobs")
    options = data.get("stream_options")
    if options is not None:
        options = _object(options, "stream_options")
        include = options.get("include_usage")
        if include is not None and not isinstance(include, bool):
            raise _fail(
                "'stream_options.include_usage' must be true or false.",
                "stream_options.include_usage",
            )
    _check_stop(data.get("stop"))
    user = data.get("user")
    if user is not None:
        _string(user, "user", max_chars=MAX_NAME_CHARS)
    tools = data.get("tools")
    if tools is not None:
        if not isinstance(tools, list):
            raise _fail("'tools' must be a list.", "tools")
        for index, tool in enumerate(tools):
            _object(tool, f"tools[{index}]")
    choice = data.get("tool_choice")
    if choice is not None and not isinstance(choice, str | Mapping):
        raise _fail("'tool_choice' must be a string or an object.", "tool_choice")
    logit_bias = data.get("logit_bias")
    if logit_bias is not None:
        for bias in _object(logit_bias, "logit_bias").values():
            if isinstance(bias, bool) or not isinstance(bias, int | float):
                raise _fail("'logit_bias' values must be numbers.", "logit_bias")
            if not -100 <= bias <= 100:
                raise _fail(
                    "'logit_bias' values must be between -100 and 100.", "logit_bias"
                )


def _check_stop(stop: Any) -> None:
    if stop is None or isinstance(stop, str):
        return
    if not isinstance(stop, list) or len(stop) > MAX_STOP_SEQUENCES:
        raise _fail(
            f"'stop' must be a string or a list of up to {MAX_STOP_SEQUENCES}.", "stop"
        )
    for index, item in enumerate(stop):
        _string(item, f"stop[{index}]")


# --- Embeddings -------------------------------------------------------------------

# OpenAI's own bounds on one embeddings request.
MAX_EMBEDDING_INPUTS = 2048
MAX_EMBEDDING_DIMENSIONS = 65536
MAX_TOKEN_ID = 2**31 - 1
ENCODING_FORMATS = frozenset({"float", "base64"})


def check_embedding_input(value: Any) -> list[str | list[int]]:
    """`input` as a list: a string, a list of strings, token ids or lists of them.

    Each text is non-empty and each token list has ids in 0..2^31-1; there are
    at most MAX_EMBEDDING_INPUTS. How long one input may be is the route's
    window (the router), and the body size bounds the whole.
    """
    if isinstance(value, str):
        items: list[Any] = [value]
    elif isinstance(value, list) and value and all(_is_int(v) for v in value):
        items = [value]
    elif isinstance(value, list) and value:
        items = value
    else:
        raise _fail(
            "'input' must be a string, a list of strings or a list of token ids.",
            "input",
        )
    if len(items) > MAX_EMBEDDING_INPUTS:
        raise _fail(f"'input' may hold at most {MAX_EMBEDDING_INPUTS} items.", "input")
    for index, item in enumerate(items):
        path = f"input[{index}]" if items is value else "input"
        if isinstance(item, str):
            if not item:
                raise _fail(f"'{path}' must not be empty.", path)
        elif isinstance(item, list) and item:
            if not all(_is_int(v) and 0 <= v <= MAX_TOKEN_ID for v in item):
                raise _fail(f"'{path}' must hold token ids (integers >= 0).", path)
        else:
            raise _fail(
                f"'{path}' must be a non-empty string or list of token ids.", path
            )
    return items


def check_embedding_params(data: Mapping[str, Any]) -> dict[str, Any]:
    """The other parameters of an embeddings request, the ones passed upstream."""
    params: dict[str, Any] = {}
    encoding = data.get("encoding_format")
    if encoding is not None:
        if encoding not in ENCODING_FORMATS:
            raise _fail("'encoding_format' must be float or base64.", "encoding_format")
        params["encoding_format"] = encoding
    dimensions = data.get("dimensions")
    if dimensions is not None:
        if not _is_int(dimensions) or not 1 <= dimensions <= MAX_EMBEDDING_DIMENSIONS:
            raise _fail("'dimensions' must be a positive integer.", "dimensions")
        params["dimensions"] = dimensions
    user = data.get("user")
    if user is not None:
        params["user"] = _string(user, "user", max_chars=MAX_NAME_CHARS)
    return params
