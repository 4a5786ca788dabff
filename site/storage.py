"""Product images: checked and re-encoded with Pillow, stored under the data folder or in S3.

An upload is never stored as sent: its header is read first (format, dimensions) and images
with too many pixels are refused before anything is decoded (a small file can expand to
gigabytes); the rest are decoded, turned upright by their EXIF orientation and encoded afresh,
which drops EXIF (GPS position, camera serial) and anything appended to or hidden in the file.
The stored name's extension and content type are those of the re-encoded image.
"""

from __future__ import annotations

import asyncio
import io
import logging
import uuid
import warnings
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageOps, UnidentifiedImageError

log = logging.getLogger("watchbuy.site.storage")
# Pillow warns of images past Image.MAX_IMAGE_PIXELS; prepare_image refuses them itself, with
# a log line of its own, before decoding (a filter per call would not be thread-safe).
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)

# Formats accepted as uploads, and what each is stored as (GIF: its first frame, as PNG).
FORMATS = {"JPEG": "JPEG", "PNG": "PNG", "WEBP": "WEBP", "GIF": "PNG"}
STORED = {"JPEG": ("jpg", "image/jpeg"), "PNG": ("png", "image/png"),
          "WEBP": ("webp", "image/webp")}
DEFAULT_MAX_PIXELS = 25_000_000
NOT_AN_IMAGE = "That file is not an image (use JPEG, PNG, WebP or GIF)."


class ImageRejected(ValueError):
    """The upload is not an image we accept; the text is fit for the form."""


@dataclass(frozen=True)
class PreparedImage:
    data: bytes  # the re-encoded image: never the uploaded bytes
    ext: str
    content_type: str
    width: int
    height: int


def prepare_image(data: bytes, max_bytes: int,
                  max_pixels: int = DEFAULT_MAX_PIXELS) -> PreparedImage:
    """The upload checked and re-encoded (JPEG, PNG or WebP, no metadata); ImageRejected
    otherwise.  CPU-bound: call it in a thread."""
    if len(data) > max_bytes:
        raise ImageRejected(f"The image is larger than {max_bytes // (1024 * 1024)} MB.")
    if not data:
        raise ImageRejected("The image file is empty.")
    # Pillow's own guard, for what the explicit check below cannot see: past twice this it
    # refuses to open, past once it warns.
    Image.MAX_IMAGE_PIXELS = max_pixels
    try:
        with Image.open(io.BytesIO(data)) as image:  # reads the header only
            kind = image.format
            width, height = image.size
            if kind not in FORMATS:
                raise ImageRejected("Use a JPEG, PNG, WebP or GIF image.")
            if width * height > max_pixels:
                raise _TooManyPixels(width, height)
            image.verify()  # chunk checksums and structure: catches truncated/forged files
        with Image.open(io.BytesIO(data)) as image:  # verify() used the first one up
            image.load()  # decodes (the first frame of an animation)
            return _encode(ImageOps.exif_transpose(image), FORMATS[kind])
    except _TooManyPixels as exc:
        log.warning("refused an image upload of %dx%d pixels (WATCHBUY_MAX_IMAGE_PIXELS=%d)",
                    exc.width, exc.height, max_pixels)
        raise ImageRejected(f"That image has too many pixels (at most {max_pixels:,}).") \
            from None
    except Image.DecompressionBombError:
        log.warning("refused an image upload Pillow took for a decompression bomb")
        raise ImageRejected(f"That image has too many pixels (at most {max_pixels:,}).") \
            from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError) as exc:
        if isinstance(exc, ImageRejected):
            raise
        raise ImageRejected(NOT_AN_IMAGE) from None


class _TooManyPixels(Exception):
    def __init__(self, width: int, height: int) -> None:
        super().__init__(f"{width}x{height}")
        self.width, self.height = width, height


def _encode(image: Image.Image, target: str) -> PreparedImage:
    if target == "JPEG":
        image = image.convert("RGB")
        options = {"quality": 90, "optimize": True}
    else:
        # PNG and WebP keep transparency; palette and odd modes become RGB(A)
        has_alpha = image.mode in ("RGBA", "LA", "PA") or \
            (image.mode == "P" and "transparency" in image.info)
        image = image.convert("RGBA" if has_alpha else "RGB")
        options = {"optimize": True} if target == "PNG" else {"quality": 90}
    out = io.BytesIO()
    # no exif=, no pnginfo=: nothing of the upload's metadata is written back
    image.save(out, target, **options)
    ext, content_type = STORED[target]
    return PreparedImage(out.getvalue(), ext, content_type, image.width, image.height)


class LocalStorage:
    def __init__(self, folder: Path) -> None:
        self.folder = folder

    async def save(self, data: bytes, ext: str, content_type: str) -> str:
        name = f"{uuid.uuid4().hex}.{ext}"
        self.folder.mkdir(parents=True, exist_ok=True)
        await asyncio.to_thread((self.folder / name).write_bytes, data)
        return name

    def url(self, name: str) -> str:
        return f"/uploads/{name}"


class S3Storage:
    """Images in an S3 bucket (boto3); configured with WATCHBUY_S3_BUCKET."""

    def __init__(self, bucket: str, prefix: str, region: str | None = None) -> None:
        import boto3

        self.bucket = bucket
        self.prefix = prefix
        self.client = boto3.client("s3", region_name=region or None)
        self.region = region

    async def save(self, data: bytes, ext: str, content_type: str) -> str:
        name = f"{self.prefix}{uuid.uuid4().hex}.{ext}"
        await asyncio.to_thread(self.client.put_object, Bucket=self.bucket, Key=name, Body=data,
                                ContentType=content_type, CacheControl="max-age=31536000")
        return name

    def url(self, name: str) -> str:
        return f"https://{self.bucket}.s3.amazonaws.com/{name}"


def make_storage(settings):
    if settings.s3_bucket:
        return S3Storage(settings.s3_bucket, settings.s3_prefix, settings.aws_region or None)
    return LocalStorage(settings.uploads_dir)
