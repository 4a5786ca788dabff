"""Product images: the checks, the local folder, and S3 (boto3 against moto)."""

from __future__ import annotations

import asyncio
import io

import pytest
from moto import mock_aws
from PIL import Image

from watchbuy.site.storage import ImageRejected, LocalStorage, S3Storage, check_image


def png(size=(8, 8)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, (200, 30, 60)).save(out, "PNG")
    return out.getvalue()


def test_check_image_accepts_images_and_refuses_the_rest():
    assert check_image(png(), 1 << 20) == ("png", "image/png")
    with pytest.raises(ImageRejected, match="not an image"):
        check_image(b"<script>alert(1)</script>", 1 << 20)
    with pytest.raises(ImageRejected, match="larger than"):
        check_image(png(), 10)
    with pytest.raises(ImageRejected, match="not an image"):
        check_image(png()[:40], 1 << 20)  # truncated


def test_local_storage_writes_under_the_data_folder(tmp_path):
    storage = LocalStorage(tmp_path / "uploads")
    name = asyncio.run(storage.save(png(), "png", "image/png"))
    assert (tmp_path / "uploads" / name).read_bytes() == png()
    assert storage.url(name) == f"/uploads/{name}"


def test_s3_storage_puts_the_object_with_its_type(monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    with mock_aws():
        import boto3

        boto3.client("s3", region_name="us-east-1").create_bucket(Bucket="wb-images")
        storage = S3Storage("wb-images", "products/", "us-east-1")
        data = png()
        name = asyncio.run(storage.save(data, "png", "image/png"))
        assert name.startswith("products/") and name.endswith(".png")
        stored = storage.client.get_object(Bucket="wb-images", Key=name)
        assert stored["Body"].read() == data
        assert stored["ContentType"] == "image/png"
        assert storage.url(name) == f"https://wb-images.s3.amazonaws.com/{name}"
