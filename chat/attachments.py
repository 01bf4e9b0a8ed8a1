"""Images in the chat: uploads checked, re-encoded, bound to questions, sent upstream.

An upload is checked by its content, never by its name or the client's
content type: Pillow must recognise it as PNG, JPEG, WebP or GIF, its pixel
count must be at most ``CHAT_IMAGE_MAX_PIXELS`` before anything is decoded
(decompression bombs), and it must decode whole (a truncated file is
refused). It is then re-encoded, which drops every piece of metadata (EXIF
with its GPS position, comments, colour profiles): JPEG stays JPEG, WebP stays
WebP, PNG stays PNG, and a GIF becomes a PNG of its first frame (OpenAI takes
only still GIFs). A small thumbnail is stored beside it.

A model takes images in the chat when every enabled chat route it has says
so (``ModelRoute.accepts_images``): a fallback that cannot read images is
never sent one, because the chat does not offer images for such a model at
all. Earlier images of a conversation continued with a text-only model are
sent as a short text note instead of image parts.
"""

from __future__ import annotations

import base64
import hashlib
import io
import uuid
import warnings
from collections.abc import Iterable, Sequence
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from django.db.models import Count, Prefetch, Q, QuerySet, prefetch_related_objects
from django.utils import timezone

from chat.conf import chat_settings
from chat.errors import ChatError
from chat.models import Attachment, Message
from gateway.context import ContextMessage
from gateway.models import ModelRoute, RouteKind

if TYPE_CHECKING:
    from PIL import Image

# Pillow format name → the content type the image is stored and served with.
FORMATS = {
    "PNG": "image/png",
    "JPEG": "image/jpeg",
    "WEBP": "image/webp",
    "GIF": "image/png",
}
THUMBNAIL_SIZE = (256, 256)
THUMBNAIL_TYPE = "image/webp"
# Unbound uploads (never sent, or their send was refused) live this long.
STALE_AFTER = timedelta(days=1)
# Uploads one user may have waiting to be sent at once.
MAX_PENDING = 40
NOTE = "[an image was attached here; this model does not take images]"


def max_bytes() -> int:
    return chat_settings().image_max_bytes


def max_pixels() -> int:
    return chat_settings().image_max_pixels


def _size_words(count: int) -> str:
    if count >= 1024 * 1024:
        return f"{count / (1024 * 1024):.1f} MiB"
    return f"{count / 1024:.0f} KiB"


def too_large(size: int | None = None) -> ChatError:
    """The refusal of an upload over CHAT_IMAGE_MAX_BYTES."""
    what = "That image" if size is None else f"That image ({_size_words(size)})"
    return ChatError(
        "too_large", f"{what} is too large; the limit is {_size_words(max_bytes())}."
    )


# --- Uploads --------------------------------------------------------------------


def _decode(data: bytes) -> tuple[Image.Image, str]:
    """Open, check and fully decode an upload; return the image and its format."""
    # Pillow (a few MiB resident) is imported by the first upload, not with
    # the chat: most processes, and all /v1 traffic, never decode an image.
    from PIL import Image, UnidentifiedImageError

    unknown = ChatError(
        "invalid", "That file is not an image we take: PNG, JPEG, WebP or GIF."
    )
    try:
        with warnings.catch_warnings():
            # Pillow's own bomb check warns (or raises) on its limit; ours is
            # checked below, before decoding, with a sentence for people.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=list(FORMATS))
    except Image.DecompressionBombError:
        # Pillow's own check, at twice its limit: far beyond ours too.
        raise _too_many_pixels(f"far more than {max_pixels():,}") from None
    except (UnidentifiedImageError, OSError):
        raise unknown from None
    if image.format not in FORMATS:
        raise unknown
    width, height = image.size
    if width < 1 or height < 1 or width * height > max_pixels():
        raise _too_many_pixels(f"{width:,} x {height:,} = {width * height:,}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image.load()
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):
        raise ChatError(
            "invalid", "That image is damaged or cut short; it could not be read."
        ) from None
    return image, image.format


def _too_many_pixels(what: str) -> ChatError:
    return ChatError(
        "too_large",
        f"That image has {what} pixels; the limit is {max_pixels():,} pixels "
        "(width x height).",
    )


def _encode(image: Image.Image, kind: str) -> tuple[bytes, str, Image.Image]:
    """Re-encode without metadata; return the bytes, content type and image."""
    from PIL import ImageOps

    # Photos carry their rotation in EXIF, which is dropped: apply it first.
    image = ImageOps.exif_transpose(image)
    # Pillow writes some of what it read back out (comments, colour profiles,
    # XMP) unless told otherwise: forget all of it.
    image.info = {}
    out = io.BytesIO()
    if kind == "JPEG":
        if image.mode not in ("RGB", "L"):
            image = image.convert("RGB")
        image.save(out, "JPEG", quality=90, optimize=True)
    elif kind == "WEBP":
        if image.mode not in ("RGB", "RGBA"):
            image = image.convert("RGBA")
        image.save(out, "WEBP", quality=90)
    else:
        # PNG, and a GIF's first frame as PNG.
        if image.mode not in ("1", "L", "LA", "P", "RGB", "RGBA", "I", "I;16"):
            image = image.convert("RGBA")
        image.save(out, "PNG", optimize=False)
    return out.getvalue(), FORMATS[kind], image


def _thumbnail(image: Image.Image) -> bytes:
    thumb = image.copy()
    if thumb.mode not in ("RGB", "RGBA"):
        thumb = thumb.convert("RGBA")
    thumb.thumbnail(THUMBNAIL_SIZE)
    out = io.BytesIO()
    thumb.save(out, "WEBP", quality=80)
    return out.getvalue()


def store_upload(user: Any, data: bytes) -> Attachment:
    """Check, re-encode and store an uploaded image; return the attachment.

    Also deletes stale unbound uploads (everyone's, older than a day): every
    upload does that much housekeeping, so no worker is needed for it.
    """
    if len(data) > max_bytes():
        raise too_large(len(data))
    if not data:
        raise ChatError("invalid", "That file is empty.")
    now = timezone.now()
    purge_stale(now)
    pending = Attachment.objects.filter(owner=user, message__isnull=True).count()
    if pending >= MAX_PENDING:
        raise ChatError(
            "too_many_uploads",
            f"You have {pending} images waiting to be sent; send or remove "
            "some before adding more.",
        )
    image, kind = _decode(data)
    encoded, content_type, shown = _encode(image, kind)
    return Attachment.objects.create(
        owner=user,
        content_type=content_type,
        data=encoded,
        thumbnail=_thumbnail(shown),
        thumbnail_content_type=THUMBNAIL_TYPE,
        width=shown.width,
        height=shown.height,
        size=len(encoded),
        sha256=hashlib.sha256(encoded).hexdigest(),
        created_at=now,
    )


def purge_stale(now: Any = None) -> int:
    """Delete unbound uploads older than a day; return how many."""
    cutoff = (now or timezone.now()) - STALE_AFTER
    deleted, _ = Attachment.objects.filter(
        message__isnull=True, created_at__lt=cutoff
    ).delete()
    return deleted


def remove_upload(user: Any, attachment_id: uuid.UUID) -> None:
    """Delete one of the user's unbound uploads (removed before sending)."""
    deleted, _ = Attachment.objects.filter(
        id=attachment_id, owner=user, message__isnull=True
    ).delete()
    if not deleted:
        raise ChatError("not_found", "No such image.")


def owned(user: Any, attachment_id: uuid.UUID, *, thumbnail: bool) -> tuple[bytes, str]:
    """The bytes and content type of the user's image (or its thumbnail)."""
    field, type_field = (
        ("thumbnail", "thumbnail_content_type")
        if thumbnail
        else ("data", "content_type")
    )
    row = (
        Attachment.objects.filter(id=attachment_id, owner=user)
        .values_list(field, type_field)
        .first()
    )
    if row is None:
        raise ChatError("not_found", "No such image.")
    return bytes(row[0]), row[1]


# --- Describing them ------------------------------------------------------------


def describe(attachment: Attachment) -> dict[str, Any]:
    """What the page shows of an attachment (never its bytes)."""
    url = f"/chat/api/attachments/{attachment.id}/"
    return {
        "id": str(attachment.id),
        "width": attachment.width,
        "height": attachment.height,
        "content_type": attachment.content_type,
        "size": attachment.size,
        "url": url,
        "thumbnail_url": f"{url}thumbnail/",
    }


_LIGHT = ("id", "message_id", "width", "height", "content_type", "size", "created_at")


def with_attachments(messages: QuerySet[Message]) -> QuerySet[Message]:
    """Messages with their attachments' descriptions (not bytes) read in one query."""
    light = Attachment.objects.only(*_LIGHT)
    return messages.prefetch_related(Prefetch("attachments", queryset=light))


def known_to_have_none(message: Message) -> None:
    """Record that a message just stored has no images, so none are read."""
    # What prefetch_related leaves behind: a queryset already evaluated, which
    # `of_message` iterates without compiling anything (it runs on the loop).
    rows = Attachment.objects.none()
    rows._result_cache = []
    rows._prefetch_done = True
    message._prefetched_objects_cache = {"attachments": rows}


def of_message(message: Message) -> list[dict[str, Any]]:
    """The attachments of one message, for its message dict."""
    if message.role != "user" or message.pk is None:
        return []
    if "attachments" in getattr(message, "_prefetched_objects_cache", {}):
        rows = message.attachments.all()
    else:
        rows = message.attachments.only(*_LIGHT)
    return [describe(a) for a in rows]


# --- Models ---------------------------------------------------------------------


def models_taking_images() -> set[str]:
    """Chat model names whose every enabled route takes images."""
    rows = (
        ModelRoute.objects.filter(
            enabled=True, endpoint__enabled=True, kind=RouteKind.CHAT
        )
        .values("model_name")
        .annotate(
            routes=Count("id"), with_images=Count("id", filter=Q(accepts_images=True))
        )
    )
    return {r["model_name"] for r in rows if r["routes"] == r["with_images"]}


def model_takes_images(model: str) -> bool:
    """Whether every enabled chat route of a model takes image parts."""
    flags = list(
        ModelRoute.objects.filter(
            model_name=model, enabled=True, endpoint__enabled=True, kind=RouteKind.CHAT
        ).values_list("accepts_images", flat=True)
    )
    return bool(flags) and all(flags)


# --- Sending them ---------------------------------------------------------------


def data_url(content_type: str, data: bytes) -> str:
    return f"data:{content_type};base64,{base64.b64encode(data).decode('ascii')}"


def content_parts(text: str, images: Iterable[tuple[str, bytes]]) -> list[dict]:
    """A user message's OpenAI content parts: its text, then its images."""
    parts: list[dict[str, Any]] = [{"type": "text", "text": text}]
    for content_type, data in images:
        parts.append(
            {
                "type": "image_url",
                "image_url": {"url": data_url(content_type, data), "detail": "auto"},
            }
        )
    return parts


def _gone() -> ChatError:
    """The refusal of an upload that was sent or removed meanwhile."""
    return ChatError(
        "not_found",
        "One of the attached images is not there any more (or was already "
        "sent); attach it again.",
    )


def check_new(user: Any, ids: Sequence[uuid.UUID]) -> list[Attachment]:
    """The user's own unbound uploads with these ids, or not_found."""
    if not ids:
        return []
    found = {
        a.id: a
        for a in Attachment.objects.filter(id__in=ids, owner=user, message__isnull=True)
    }
    if len(found) != len(set(ids)):
        raise _gone()
    return [found[i] for i in dict.fromkeys(ids)]


def prepare(user: Any, turn: Any, ids: Sequence[uuid.UUID]) -> None:
    """Put the images of a planned turn into its history, before anything is stored.

    New uploads (`ids`) must be the user's own, unbound, and the model must
    take images; earlier images of the conversation go along as image parts
    too, or as a text note for a model that does not take them.
    """
    new = check_new(user, ids)
    known = [m.id for m in turn.history if isinstance(m.id, int) and m.role == "user"]
    if not new and not known:
        return
    earlier = (
        Attachment.objects.filter(message_id__in=known).order_by("created_at", "id")
        if known
        else Attachment.objects.none()
    )
    with_images = set(earlier.values_list("message_id", flat=True))
    if not new and not with_images:
        return
    takes = model_takes_images(turn.model)
    if new and not takes:
        raise ChatError(
            "invalid",
            f"The model {turn.model[:80]!r} does not take images; choose a model "
            "marked “images”, or remove the images.",
        )
    by_message: dict[int, list[tuple[str, bytes]]] = {}
    if takes:
        rows = earlier.values_list("message_id", "content_type", "data")
        for message_id, content_type, data in rows:
            by_message.setdefault(message_id, []).append((content_type, bytes(data)))
    else:
        for message_id in earlier.values_list("message_id", flat=True):
            by_message.setdefault(message_id, []).append(("", b""))
    question = turn.history[-1]
    for message in turn.history:
        images = by_message.get(message.id, []) if isinstance(message.id, int) else []
        if message is question:
            images = images + [(a.content_type, bytes(a.data)) for a in new]
        if images and isinstance(message.content, str):
            _with_images(message, images, takes)
    turn.attachment_ids = [a.id for a in new]


def _with_images(
    message: ContextMessage, images: list[tuple[str, bytes]], takes: bool
) -> None:
    if takes:
        message.content = content_parts(message.content, images)
    else:
        message.content = f"{message.content}\n\n" + "\n".join(NOTE for _ in images)
    message.tokens = None


def carry_over(source: Message | None, target: Message) -> None:
    """Give a question's new version (an edit) the images of the one edited.

    Copies, so each version owns its images and deleting one leaves the
    other whole; inside the turn's transaction.
    """
    if source is None:
        return
    copies = [
        Attachment(
            owner_id=image.owner_id,
            message=target,
            content_type=image.content_type,
            data=image.data,
            thumbnail=image.thumbnail,
            thumbnail_content_type=image.thumbnail_content_type,
            width=image.width,
            height=image.height,
            size=image.size,
            sha256=image.sha256,
            created_at=image.created_at,
        )
        for image in Attachment.objects.filter(message=source).order_by(
            "created_at", "id"
        )
    ]
    Attachment.objects.bulk_create(copies)


def bind(turn: Any, question: Message) -> None:
    """Bind a committed turn's new uploads to its question (inside its transaction).

    Refuses (and so rolls the turn back) when one of them was sent or
    removed since the turn was planned.
    """
    ids = list(getattr(turn, "attachment_ids", None) or ())
    if ids:
        bound = Attachment.objects.filter(
            id__in=ids, owner_id=turn.conversation.user_id, message__isnull=True
        ).update(message=question)
        if bound != len(ids):
            raise _gone()
    # The question's dict is made in async code next: read its images now.
    light = Attachment.objects.only(*_LIGHT)
    prefetch_related_objects([question], Prefetch("attachments", queryset=light))
