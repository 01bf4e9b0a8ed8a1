"""The chat page with a real model: SmolLM2 on the llama.cpp server, as in
`make run-model`. Skipped, saying how to build it, when the server is not built.
"""

from __future__ import annotations

import pytest

from chat.models import Message, MessageRole, MessageStatus
from gateway import router
from gateway.models import Endpoint, ModelRoute, UsageRecord, UsageStatus
from scripts import peers
from tests.e2e.test_chat_browser import answer_text, ask, wait_for_answer
from tests.interop.conftest import llama_server  # noqa: F401

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]

MODEL = peers.SMOLLM2_ALIAS


@pytest.fixture
def smollm2(llama_server, settings) -> Endpoint:  # noqa: F811
    """The model `smollm2` on the llama.cpp server alone, short answers."""
    settings.RATE_LIMIT_RPM = 10_000
    endpoint = Endpoint.objects.create(
        name="llama", base_url=f"{llama_server.base_url}/v1", max_retries=1
    )
    ModelRoute.objects.create(
        model_name=MODEL,
        endpoint=endpoint,
        upstream_model=MODEL,
        context_window=peers.SMOLLM2_CONTEXT,
        max_output_tokens=32,
    )
    router.forget_routes()
    return endpoint


def test_the_chat_shows_a_real_answer_from_smollm2(
    page, login, owner, smollm2, screenshot
):
    login(page, owner)
    page.wait_for_function("window.llmsiteChat.socket.connected")
    assert page.locator("#model option").all_inner_texts() == [f"{MODEL} · 2k"]

    ask(page, "What colour is the sky on a clear day?")
    wait_for_answer(page, timeout=30_000)

    shown = answer_text(page)
    screenshot(page, "real-model-answer")
    answer = Message.objects.get(role=MessageRole.ASSISTANT)
    assert answer.status == MessageStatus.COMPLETE
    assert shown.strip() and shown.strip() == answer.content.strip()
    assert answer.endpoint_name == "llama"
    record = UsageRecord.objects.get(id=answer.usage_id)
    assert (record.status, record.tokens_estimated) == (UsageStatus.OK, True)
