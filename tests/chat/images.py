"""Small images made on the fly for the image tests."""

from __future__ import annotations

import io
import struct
import zlib

from PIL import Image


def image_bytes(fmt: str = "PNG", size: tuple[int, int] = (40, 30), **save) -> bytes:
    """An image of `size` in `fmt`, coloured so it is not all one value."""
    mode = "RGB" if fmt in ("JPEG", "GIF") else "RGBA"
    image = Image.new(
        mode, size, (200, 30, 60) if mode == "RGB" else (200, 30, 60, 255)
    )
    image.putpixel((0, 0), (0, 0, 0) if mode == "RGB" else (0, 0, 0, 255))
    out = io.BytesIO()
    image.save(out, fmt, **save)
    return out.getvalue()


def png_claiming(width: int, height: int) -> bytes:
    """A PNG whose header claims a size its (tiny) data never fills: a bomb's shape."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    pixels = zlib.compress(b"\0" * 1024)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", pixels)
        + chunk(b"IEND", b"")
    )
