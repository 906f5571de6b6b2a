"""The web playground: one self-contained HTML page (``playground.html`` beside this module,
inline CSS and JavaScript, no external assets) that the ingress serves at ``/`` and
``/playground``.

The page holds no secret: the API key is typed into it and sent as ``Authorization: Bearer``
on the same routes every other client uses. Its response carries a Content-Security-Policy
that lets it talk only to its own origin and run only its own inline script (by hash), so a
page that tried to load a CDN asset or post elsewhere would be stopped by the browser.
"""

from __future__ import annotations

import base64
import hashlib
import re
from functools import lru_cache
from pathlib import Path

PAGE = Path(__file__).with_name("playground.html")
#: Paths the page is served at (open without the API key, like the health checks).
PATHS = ("/", "/playground")

_SCRIPT = re.compile(r"<script>(.*?)</script>", re.DOTALL)


@lru_cache(maxsize=1)
def page() -> str:
    """The page's HTML (read once per process)."""
    return PAGE.read_text(encoding="utf-8")


@lru_cache(maxsize=1)
def headers() -> dict[str, str]:
    """Response headers of the page: a strict CSP (own origin only; the inline script allowed
    by its SHA-256), no MIME sniffing, no framing, no referrer, no caching of an old page."""
    hashes = " ".join(
        "'sha256-" + base64.b64encode(hashlib.sha256(s.encode()).digest()).decode() + "'"
        for s in _SCRIPT.findall(page())
    )
    csp = (
        "default-src 'none'; "
        f"script-src {hashes}; "
        "style-src 'unsafe-inline'; "
        "img-src 'self' data: blob:; "
        "connect-src 'self'; "
        "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    )
    return {
        "Content-Security-Policy": csp,
        "X-Content-Type-Options": "nosniff",
        "X-Frame-Options": "DENY",
        "Referrer-Policy": "no-referrer",
        "Cache-Control": "no-cache",
    }
