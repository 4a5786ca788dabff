"""Product images: checked with Pillow, stored under the data folder or in S3."""

from __future__ import annotations

import asyncio
import io
import uuid
from pathlib import Path

from PIL import Image, UnidentifiedImageError

FORMATS = {"JPEG": ("jpg", "image/jpeg"), "PNG": ("png", "image/png"),
           "WEBP": ("webp", "image/webp"), "GIF": ("gif", "image/gif")}


class ImageRejected(ValueError):
    """The upload is not an image we accept; the text is fit for the form."""


def check_image(data: bytes, max_bytes: int) -> tuple[str, str]:
    """(file extension, content type) of an acceptable image; ImageRejected otherwise."""
    if len(data) > max_bytes:
        raise ImageRejected(f"The image is larger than {max_bytes // (1024 * 1024)} MB.")
    if not data:
        raise ImageRejected("The image file is empty.")
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.verify()  # decodes enough to catch truncated or forged files
            kind = image.format
            width, height = image.size
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError):
        raise ImageRejected("That file is not an image (use JPEG, PNG, WebP or GIF).") from None
    if kind not in FORMATS:
        raise ImageRejected("Use a JPEG, PNG, WebP or GIF image.")
    if width * height > 40_000_000:
        raise ImageRejected("That image has too many pixels.")
    return FORMATS[kind]


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
