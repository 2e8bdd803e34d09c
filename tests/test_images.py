import io
import threading
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
from PIL import Image

from backend.images import ImageError, ImageLoader, decode_image, pixel_hash, task_image_url
from backend.settings import Settings

GREY = (np.arange(60 * 80).reshape(60, 80) % 251).astype(np.uint8)


def encode(im: Image.Image, fmt="PNG", **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kw)
    return buf.getvalue()


def settings(**env) -> Settings:
    return Settings.from_env({k: str(v) for k, v in env.items()})


# --- decoding ----------------------------------------------------------------------------------

def test_grey_rgb_palette_decode_to_the_same_array():
    assert np.array_equal(decode_image(encode(Image.fromarray(GREY)), 10**7), GREY)
    rgb = Image.fromarray(np.repeat(GREY[:, :, None], 3, axis=2))
    assert np.array_equal(decode_image(encode(rgb), 10**7), GREY)
    assert np.array_equal(decode_image(encode(rgb.convert("P", palette=Image.Palette.ADAPTIVE)), 10**7), GREY)
    out = decode_image(encode(rgb, "JPEG", quality=95), 10**7)
    assert out.shape == GREY.shape and out.dtype == np.uint8
    assert np.abs(out.astype(int) - GREY).mean() < 3


def test_rgba_is_composited_on_black():
    rgba = np.zeros((10, 10, 4), np.uint8)
    rgba[..., :3] = 200
    rgba[:, :5, 3] = 255  # left half opaque, right half transparent
    out = decode_image(encode(Image.fromarray(rgba, "RGBA")), 10**7)
    assert (out[:, :5] == 200).all() and (out[:, 5:] == 0).all()


@pytest.mark.parametrize("maximum,bits", [(4095, 12), (65535, 16), (1023, 10)])
def test_16_bit_scaled_by_its_bit_depth(maximum, bits):
    arr = np.linspace(0, maximum, 100 * 10).reshape(10, 100).astype(np.uint16)
    out = decode_image(encode(Image.fromarray(arr)), 10**7)
    assert out.dtype == np.uint8 and out.max() == 255 and out.min() == 0
    assert out[0, 50] == round(float(arr[0, 50]) * 255 / (2**bits - 1))


def test_cmyk_decodes():
    cmyk = Image.fromarray(np.repeat(GREY[:, :, None], 3, axis=2)).convert("CMYK")
    out = decode_image(encode(cmyk, "JPEG"), 10**7)
    assert out.shape == GREY.shape


def test_exif_orientation_is_applied():
    im = Image.fromarray(GREY)  # 80 wide, 60 high
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 CW on display
    out = decode_image(encode(im, "JPEG", exif=exif, quality=95), 10**7)
    assert out.shape == (80, 60)


def test_corrupt_truncated_and_bomb_are_clear_errors():
    with pytest.raises(ImageError, match="not a readable image"):
        decode_image(b"this is not an image", 10**7)
    data = encode(Image.fromarray(GREY))
    with pytest.raises(ImageError, match="corrupt or truncated"):
        decode_image(data[: len(data) // 2], 10**7)
    # a 20000 x 20000 PNG of zeros compresses to a few hundred kB: refused from its header
    bomb = encode(Image.new("L", (20000, 20000)))
    with pytest.raises(ImageError, match="exceeds the limit") as err:
        decode_image(bomb, 50_000_000)
    assert err.value.status == 413


def test_pixel_hash_depends_on_content_and_shape():
    assert pixel_hash(GREY) == pixel_hash(GREY.copy())
    assert pixel_hash(GREY) != pixel_hash(GREY.T.copy())
    other = GREY.copy()
    other[0, 0] ^= 1
    assert pixel_hash(GREY) != pixel_hash(other)


def test_task_image_url_errors():
    assert task_image_url({"data": {"image": " /data/upload/1/x.png "}}, "image") == "/data/upload/1/x.png"
    with pytest.raises(ImageError, match="no 'image' image URL"):
        task_image_url({"data": {"img": "x"}}, "image")
    with pytest.raises(ImageError, match="no 'data'"):
        task_image_url({"id": 1}, "image")


# --- resolving and fetching --------------------------------------------------------------------

@pytest.fixture
def image_root(tmp_path):
    root = tmp_path / "root"
    (root / "images").mkdir(parents=True)
    Image.fromarray(GREY).save(root / "images" / "a.png")
    (tmp_path / "secret.png").write_bytes(encode(Image.fromarray(GREY)))
    (root / "images" / "link.png").symlink_to(tmp_path / "secret.png")
    return root


def test_local_files_only_under_the_document_root(image_root):
    loader = ImageLoader(settings(LOCAL_FILES_DOCUMENT_ROOT=image_root))
    assert np.array_equal(loader.load("/data/local-files/?d=images/a.png").pixels, GREY)
    assert np.array_equal(loader.load(str(image_root / "images" / "a.png")).pixels, GREY)
    for escape in ("/data/local-files/?d=../secret.png", "/data/local-files/?d=images/link.png",
                   "/data/local-files/?d=/etc/passwd", f"file://{image_root.parent / 'secret.png'}"):
        with pytest.raises(ImageError, match="outside the document root") as err:
            loader.load(escape)
        assert err.value.status == 403
    with pytest.raises(ImageError, match="not found") as err:
        loader.load("/data/local-files/?d=images/missing.png")
    assert err.value.status == 404


def test_a_relative_document_root_is_read_from_the_working_directory(image_root, monkeypatch):
    monkeypatch.chdir(image_root.parent)  # LOCAL_FILES_DOCUMENT_ROOT=root, as in a .env next to the data
    loader = ImageLoader(settings(LOCAL_FILES_DOCUMENT_ROOT="root"))
    assert np.array_equal(loader.load("/data/local-files/?d=images/a.png").pixels, GREY)
    with pytest.raises(ImageError, match="outside the document root"):
        loader.load("/data/local-files/?d=../secret.png")


def test_local_paths_refused_without_a_root():
    with pytest.raises(ImageError, match="LOCAL_FILES_DOCUMENT_ROOT is not set"):
        ImageLoader(settings()).load("/srv/x.png")


class _Handler(SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_GET(self):
        self.server.seen.append((self.path, self.headers.get("Authorization")))
        if self.path.startswith("/redirect-out"):
            self.send_response(302)
            self.send_header("Location", "http://localhost:1/x.png")
            self.end_headers()
            return
        if self.path.startswith("/redirect-in"):
            self.send_response(302)
            self.send_header("Location", "/data/upload/1/a.png")
            self.end_headers()
            return
        if self.path.startswith("/data/upload/1/"):
            self.path = "/images/" + self.path.rsplit("/", 1)[1]
        super().do_GET()


@pytest.fixture
def http_root(image_root):
    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(_Handler, directory=str(image_root)))
    server.seen = []
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server
    server.shutdown()


def test_label_studio_urls_with_auth(http_root):
    base = f"http://127.0.0.1:{http_root.server_port}"
    loader = ImageLoader(settings(LABEL_STUDIO_URL=base, LABEL_STUDIO_API_KEY="secret-token"))
    assert np.array_equal(loader.load("/data/upload/1/a.png").pixels, GREY)
    assert np.array_equal(loader.load(f"{base}/data/upload/1/a.png").pixels, GREY)
    assert http_root.seen[-1] == ("/data/upload/1/a.png", "Token secret-token")
    # without LABEL_STUDIO_URL, the hostname /setup sent is Label Studio only if it is allowlisted
    with pytest.raises(ImageError, match="no LABEL_STUDIO_URL is set"):
        ImageLoader(settings(), hostname=base, access_token="from-setup").load("/data/upload/1/a.png")
    for entry in (f"https://127.0.0.1:{http_root.server_port}", "127.0.0.1"):  # another scheme, another port
        with pytest.raises(ImageError, match="no LABEL_STUDIO_URL is set"):
            ImageLoader(settings(IMAGE_HOST_ALLOWLIST=entry), hostname=base).load("/data/upload/1/a.png")
    loader = ImageLoader(settings(IMAGE_HOST_ALLOWLIST=base), hostname=base, access_token="from-setup")
    loader.load("/data/upload/1/a.png")
    assert http_root.seen[-1][1] == "Token from-setup"
    # a redirect within Label Studio is followed
    assert np.array_equal(loader.load(f"{base}/redirect-in").pixels, GREY)
    assert http_root.seen[-1] == ("/data/upload/1/a.png", "Token from-setup")
    with pytest.raises(ImageError, match="HTTP 404") as err:
        loader.load("/data/upload/1/missing.png")
    assert err.value.status == 404


def test_foreign_hosts_and_redirects_out_are_refused(http_root):
    base = f"http://127.0.0.1:{http_root.server_port}"
    loader = ImageLoader(settings(LABEL_STUDIO_URL=base, LABEL_STUDIO_API_KEY="tok"))
    n = len(http_root.seen)
    with pytest.raises(ImageError, match="not Label Studio's") as err:
        loader.load("http://example.invalid/a.png")
    assert err.value.status == 403 and len(http_root.seen) == n  # refused before any request
    with pytest.raises(ImageError, match="'localhost:1' is not Label Studio's"):
        loader.load(f"{base}/redirect-out")
    for entry in ("127.0.0.1", f"https://127.0.0.1:{http_root.server_port}"):  # the default port, another scheme
        with pytest.raises(ImageError, match="not in IMAGE_HOST_ALLOWLIST"):
            ImageLoader(settings(LABEL_STUDIO_URL="http://ls.invalid", IMAGE_HOST_ALLOWLIST=entry)).load(f"{base}/images/a.png")
    allowed = ImageLoader(settings(LABEL_STUDIO_URL="http://ls.invalid", LABEL_STUDIO_API_KEY="tok", IMAGE_HOST_ALLOWLIST=base))
    assert np.array_equal(allowed.load(f"{base}/images/a.png").pixels, GREY)
    assert http_root.seen[-1][1] is None  # no token sent to an allowlisted third-party host
    with pytest.raises(ImageError, match="unsupported image URL scheme"):
        loader.load("s3://bucket/a.png")


def test_download_size_cap(http_root):
    base = f"http://127.0.0.1:{http_root.server_port}"
    loader = ImageLoader(settings(LABEL_STUDIO_URL=base, MAX_DOWNLOAD_BYTES=100))
    with pytest.raises(ImageError, match="MAX_DOWNLOAD_BYTES") as err:
        loader.load("/data/upload/1/a.png")
    assert err.value.status == 413
