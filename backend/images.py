"""Safe image loading for tasks: resolve a Label Studio URL, fetch it, decode it.

One array convention leaves this module: `(H, W) uint8` grey, EXIF orientation applied.
Grey, RGB, RGBA (composited on black), palette, CMYK and 16-bit images all end there; 16-bit
pixels are scaled by the smallest bit depth (8, 10, 12, 14, 16) that holds their maximum,
so 12-bit radiographs stored in 16-bit PNGs keep their contrast.

What is refused, each with an `ImageError` carrying an HTTP-like status and a reason:
origins (scheme, host and port) other than Label Studio's and IMAGE_HOST_ALLOWLIST's (also after
a redirect), local paths outside LOCAL_FILES_DOCUMENT_ROOT (`..` and symlink escapes included),
downloads over MAX_DOWNLOAD_BYTES or past DOWNLOAD_TIMEOUT (the whole download, not each read),
images over MAX_IMAGE_PIXELS (checked from the header, before decoding; Pillow's own guard stays
on for every other reader in the process), and bytes that are not a complete image.

Label Studio is LABEL_STUDIO_URL. Without it, the hostname a caller of /setup names stands for
Label Studio only if it is an allowlisted origin, and then gets only the token /setup sent with it
(never LABEL_STUDIO_API_KEY); tokens go to Label Studio's origin only.
"""
from __future__ import annotations

import hashlib
import io
import logging
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping
from urllib.parse import parse_qs, unquote, urljoin, urlparse

import httpx
import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from backend.settings import Settings

logger = logging.getLogger(__name__)

_MAX_REDIRECTS = 3
_DEFAULT_PORTS = {"http": 80, "https": 443}


class ImageError(Exception):
    """A task image that cannot be used; `status` is the matching HTTP status."""

    def __init__(self, reason: str, status: int = 400):
        super().__init__(reason)
        self.reason = reason
        self.status = status


@dataclass(frozen=True)
class XrayImage:
    """A decoded image: `pixels` (H, W) uint8 grey; `sha1` of its pixels and shape."""

    pixels: np.ndarray
    sha1: str
    source: str

    @classmethod
    def of(cls, pixels: np.ndarray, source: str) -> "XrayImage":
        """The decoded image `pixels` from `source` (a URL, a file, a name), its hash computed."""
        return cls(pixels, pixel_hash(pixels), source)

    @property
    def height(self) -> int:
        return int(self.pixels.shape[0])

    @property
    def width(self) -> int:
        return int(self.pixels.shape[1])


def pixel_hash(pixels: np.ndarray) -> str:
    """Content hash of a decoded image (shape and bytes), the key of the SAM embedding cache."""
    h = hashlib.sha1(f"{pixels.shape}{pixels.dtype}".encode())
    h.update(np.ascontiguousarray(pixels).data)
    return h.hexdigest()


def task_image_url(task: Mapping[str, Any], value_key: str) -> str:
    """The image URL of a Label Studio task for the config's image key (e.g. "image")."""
    data = task.get("data")
    if not isinstance(data, Mapping):
        raise ImageError("task has no 'data' object")
    url = data.get(value_key)
    if not isinstance(url, str) or not url.strip():
        raise ImageError(f"task data has no '{value_key}' image URL (keys: {sorted(data)})")
    return url.strip()


# --- decoding ------------------------------------------------------------------------------

def _scale_high_bit(arr: np.ndarray) -> np.ndarray:
    top = float(arr.max()) if arr.size else 0.0
    for bits in (8, 10, 12, 14, 16):
        if top <= 2**bits - 1:
            break
    scale = 255.0 / (2**bits - 1)
    return np.clip(np.rint(arr.astype(np.float64) * scale), 0, 255).astype(np.uint8)


def decode_image(data: bytes, max_pixels: int, source: str = "image") -> np.ndarray:
    """Image file bytes -> (H, W) uint8 grey. Raises ImageError (400 corrupt, 413 too large)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            im = Image.open(io.BytesIO(data))
            width, height = im.size
            if width * height > max_pixels:
                raise ImageError(f"{source}: {width}x{height} = {width * height} pixels exceeds the limit "
                                 f"of {max_pixels} (MAX_IMAGE_PIXELS)", 413)
            im.load()
            im = ImageOps.exif_transpose(im)
    except ImageError:
        raise
    except Image.DecompressionBombError as exc:  # Pillow's own limit, above ours unless MAX_IMAGE_PIXELS is huge
        raise ImageError(f"{source}: the image exceeds the limit of Pillow's decompression-bomb check ({exc}); "
                         f"MAX_IMAGE_PIXELS is {max_pixels}", 413) from None
    except (UnidentifiedImageError, ImportError):
        # ImportError: ultralytics patches Image.open to retry unknown files with the optional
        # pi-heif plugin, which is not installed (and never installed at run time here)
        raise ImageError(f"{source}: not a readable image (unknown or corrupt format)") from None
    except (OSError, SyntaxError, ValueError) as exc:  # truncated files, broken chunks
        raise ImageError(f"{source}: corrupt or truncated image ({exc})") from None
    return _to_grey(im)


def _to_grey(im: Image.Image) -> np.ndarray:
    mode = im.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        return _scale_high_bit(np.asarray(im).astype(np.int64).clip(0, None))
    if mode == "F":
        arr = np.nan_to_num(np.asarray(im, dtype=np.float64))
        span = arr.max() - arr.min()
        return np.zeros(arr.shape, np.uint8) if span <= 0 else np.rint((arr - arr.min()) / span * 255).astype(np.uint8)
    if mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        black = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        im = Image.alpha_composite(black, rgba)
    return np.asarray(im.convert("L"), dtype=np.uint8).copy()


# --- fetching ------------------------------------------------------------------------------

def _host(url: str) -> str:
    parsed = urlparse(url)
    host = (parsed.hostname or "").lower()
    port = parsed.port
    return f"{host}:{port}" if port else host


Origin = tuple[str, str, int]


def origin(url: str) -> Origin | None:
    """(scheme, host, port) of an http(s) URL, the port defaulted; None for anything else."""
    try:
        parsed = urlparse(url)
        port = parsed.port
    except ValueError:
        return None
    if parsed.scheme not in _DEFAULT_PORTS or not parsed.hostname:
        return None
    return parsed.scheme, parsed.hostname.lower(), port or _DEFAULT_PORTS[parsed.scheme]


def allowlist_origins(entries: tuple[str, ...]) -> set[Origin]:
    """IMAGE_HOST_ALLOWLIST entries ("https://host", "http://host:8081", or a bare "host[:port]",
    read as https) -> origins."""
    found = set()
    for entry in entries:
        o = origin(entry if "://" in entry else f"https://{entry}")
        if o is None:
            raise ValueError(f"IMAGE_HOST_ALLOWLIST entry {entry!r} is not an http(s) origin")
        found.add(o)
    return found


_TOKEN_CLIENTS: dict[tuple[str, str], Any] = {}
_TOKEN_CLIENTS_LOCK = threading.Lock()


def _token_client(base_url: str, api_key: str, timeout: float):
    """label_studio_sdk's client wrapper for one Label Studio and key, one per process: it keeps
    the access token it refreshed from a personal access token until that expires."""
    from label_studio_sdk.core.client_wrapper import SyncClientWrapper

    with _TOKEN_CLIENTS_LOCK:
        client = _TOKEN_CLIENTS.get((base_url, api_key))
        if client is None:
            client = SyncClientWrapper(api_key=api_key, base_url=base_url, httpx_client=httpx.Client(timeout=timeout))
            if len(_TOKEN_CLIENTS) >= 64:  # keys change rarely; keep the table small anyway
                _TOKEN_CLIENTS.clear()
            _TOKEN_CLIENTS[(base_url, api_key)] = client
        return client


class ImageLoader:
    """Loads task images for one Label Studio connection.

    base_url / api_key: Label Studio's (LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY or /setup's token;
    without LABEL_STUDIO_URL an allowlisted hostname from /setup with its own token).
    """

    def __init__(self, settings: Settings, hostname: str = "", access_token: str = ""):
        self.settings = settings
        self.allowlist = allowlist_origins(settings.image_host_allowlist)
        named = "" if settings.label_studio_url else self.trusted_hostname(settings, hostname)
        self.base_url = (settings.label_studio_url or named).rstrip("/")
        # LABEL_STUDIO_API_KEY goes to LABEL_STUDIO_URL only; an allowlisted host that /setup named as
        # Label Studio gets the token that /setup sent with it, nothing else
        self.api_key = (settings.label_studio_api_key or access_token) if settings.label_studio_url else \
            (access_token if named else "")

    @staticmethod
    def trusted_hostname(settings: Settings, hostname: str) -> str:
        """The hostname /setup sent, if it may stand for Label Studio: the origin of
        LABEL_STUDIO_URL or an allowlisted one; else ""."""
        o = origin(hostname or "")
        if o is None:
            return ""
        if o == origin(settings.label_studio_url) or o in allowlist_origins(settings.image_host_allowlist):
            return hostname
        return ""

    # origins
    def _allowed(self, url: str) -> bool:
        o = origin(url)
        return o is not None and (o == origin(self.base_url) or o in self.allowlist)

    def _is_label_studio(self, url: str) -> bool:
        return bool(self.base_url) and origin(url) == origin(self.base_url)

    def auth_headers(self) -> dict[str, str]:
        """Authorization header for Label Studio, as label_studio_sdk's client makes it: the legacy
        token, or for a personal access token (a JWT refresh token) an access token that the SDK
        refreshes from it when it expires."""
        if not self.api_key:
            return {}
        from label_studio_sdk.core.api_error import ApiError

        try:
            return {"Authorization": _token_client(self.base_url, self.api_key,
                                                   self.settings.download_timeout).get_headers()["Authorization"]}
        except ApiError as exc:
            raise ImageError(f"Label Studio rejected the API key: {exc.body}", 401) from None
        except (httpx.HTTPError, ValueError) as exc:  # Label Studio down, or a non-JSON answer to the refresh
            raise ImageError(f"could not get an access token from Label Studio ({exc.__class__.__name__})", 502) \
                from None

    def resolve(self, url: str) -> tuple[str, Path | None]:
        """A task URL -> (absolute http(s) URL, or "" with a local Path)."""
        parsed = urlparse(url)
        if parsed.scheme in ("http", "https"):
            return url, None
        if parsed.scheme == "file":
            return "", self._local(Path(unquote(parsed.path)))
        if parsed.scheme:
            raise ImageError(f"unsupported image URL scheme {parsed.scheme!r} in {url!r}")
        if url.startswith("/data/local-files"):
            root = self.settings.local_files_document_root
            rel = (parse_qs(parsed.query).get("d") or [""])[0]
            if not rel:
                raise ImageError(f"local-files URL without ?d=: {url!r}")
            if root is not None:
                return "", self._local(Path(rel))  # relative to the root (an absolute one is refused below)
        if url.startswith("/data/") or url.startswith("/api/"):
            if not self.base_url:
                raise ImageError(f"{url!r} is relative to Label Studio, but no LABEL_STUDIO_URL is set "
                                 f"and /setup sent no hostname")
            return urljoin(self.base_url + "/", url.lstrip("/")), None
        if url.startswith("/"):
            return "", self._local(Path(url))
        raise ImageError(f"cannot resolve image URL {url!r}")

    def _local(self, path: Path) -> Path:
        root = self.settings.local_files_document_root
        if root is None:
            raise ImageError(f"local path {str(path)!r} refused: LOCAL_FILES_DOCUMENT_ROOT is not set", 403)
        real_root = root.resolve()
        real = (path if path.is_absolute() else real_root / path).resolve()
        if real != real_root and real_root not in real.parents:
            raise ImageError(f"local path {str(path)!r} is outside the document root", 403)
        return real

    def fetch(self, url: str) -> bytes:
        """Raw bytes of the image at a task URL, within the size and time limits."""
        http_url, local = self.resolve(url)
        if local is not None:
            return self._read_local(local)
        return self._download(http_url)

    def _read_local(self, path: Path) -> bytes:
        try:
            size = path.stat().st_size
            if size > self.settings.max_download_bytes:
                raise ImageError(f"{path.name}: {size} bytes exceeds MAX_DOWNLOAD_BYTES", 413)
            return path.read_bytes()
        except FileNotFoundError:
            raise ImageError(f"image file not found: {path.name}", 404) from None
        except IsADirectoryError:
            raise ImageError(f"not a file: {path.name}", 400) from None

    def _download(self, url: str) -> bytes:
        """GET `url` (redirects followed by hand, each target checked) within MAX_DOWNLOAD_BYTES and
        one DOWNLOAD_TIMEOUT for the whole download: a server that trickles bytes is cut off at the
        first read after the time is up, one that stalls when a read waited DOWNLOAD_TIMEOUT."""
        limit, seconds = self.settings.max_download_bytes, self.settings.download_timeout
        deadline = time.monotonic() + seconds
        timed_out = ImageError(f"download of {_display(url)} took longer than DOWNLOAD_TIMEOUT ({seconds:g} s)", 504)
        with httpx.Client(follow_redirects=False) as client:
            for _ in range(_MAX_REDIRECTS + 1):
                if not self._allowed(url):
                    raise ImageError(f"image origin {_host(url)!r} is not Label Studio's and not in "
                                     f"IMAGE_HOST_ALLOWLIST", 403)
                headers = self.auth_headers() if self._is_label_studio(url) else {}
                left = deadline - time.monotonic()
                if left <= 0:
                    raise timed_out
                try:
                    with client.stream("GET", url, headers=headers, timeout=httpx.Timeout(left)) as resp:
                        if resp.is_redirect:
                            url = urljoin(url, resp.headers.get("location", ""))
                            continue
                        if resp.status_code != 200:
                            raise ImageError(f"download of {_display(url)} failed: HTTP {resp.status_code}",
                                             404 if resp.status_code == 404 else 502)
                        declared = int(resp.headers.get("content-length") or 0)
                        if declared > limit:
                            raise ImageError(f"{_display(url)}: {declared} bytes exceeds MAX_DOWNLOAD_BYTES", 413)
                        chunks, total = [], 0
                        for chunk in resp.iter_bytes():
                            if time.monotonic() > deadline:
                                raise timed_out
                            total += len(chunk)
                            if total > limit:
                                raise ImageError(f"{_display(url)}: more than {limit} bytes (MAX_DOWNLOAD_BYTES)", 413)
                            chunks.append(chunk)
                        if time.monotonic() > deadline:
                            raise timed_out
                        return b"".join(chunks)
                except httpx.TimeoutException:
                    raise timed_out from None
                except httpx.HTTPError as exc:
                    raise ImageError(f"download of {_display(url)} failed: {exc.__class__.__name__}", 502) from None
        raise ImageError(f"too many redirects for {_display(url)}", 502)

    def load(self, url: str) -> XrayImage:
        """Fetch and decode: the task image as (H, W) uint8 grey with its content hash."""
        pixels = decode_image(self.fetch(url), self.settings.max_image_pixels, source=_display(url))
        return XrayImage.of(pixels, url)


def _display(url: str) -> str:
    """A URL without its query string (which may carry tokens), for messages and logs."""
    parsed = urlparse(url)
    if parsed.path.startswith("/data/local-files"):
        return url
    return parsed._replace(query="", fragment="").geturl() or url
