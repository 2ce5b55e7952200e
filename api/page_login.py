"""The page under `--api-key`: a browser sends no `Authorization` header by itself, so the
page asks for the key once (a form, no script) and keeps a cookie the guard accepts too.

The cookie holds an HMAC of the key, never the key: `HttpOnly` (no script reads it),
`SameSite=Strict` (another site's page cannot make the browser send it along).
"""

from __future__ import annotations

import hashlib
import hmac
import html
from collections.abc import Awaitable, Callable
from http.cookies import CookieError, SimpleCookie
from urllib.parse import parse_qs

from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response

COOKIE = "exojet_page"
LOGIN_PATH = "/login"
# A key is short; a body beyond this is not a login.
MAX_FORM_BYTES = 4096


def page_token(key: bytes) -> str:
    """The cookie's value for `key`."""
    return hmac.new(key, b"exojet page cookie", hashlib.sha256).hexdigest()


def has_page_cookie(cookie_header: bytes, key: bytes) -> bool:
    """Whether the request's Cookie header carries the page cookie for `key`."""
    try:
        cookies = SimpleCookie(cookie_header.decode("latin-1"))
    except CookieError:
        return False
    morsel = cookies.get(COOKIE)
    return morsel is not None and hmac.compare_digest(morsel.value.encode(), page_token(key).encode())


def login_form(message: str = "") -> HTMLResponse:
    """The 401 a browser gets for the page without the key: a form that asks for it."""
    note = f'<p class="error">{html.escape(message)}</p>' if message else ""
    body = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>exojet: API key</title><link rel="icon" href="data:,"></head>
<body><h1>exojet</h1><p>This API was started with <code>--api-key</code>: enter the key to see the page.</p>{note}
<form method="post" action="{LOGIN_PATH}"><input type="password" name="key" autocomplete="current-password" autofocus>
<button type="submit">open</button></form></body></html>
"""
    return HTMLResponse(body, 401, headers={"WWW-Authenticate": "Bearer"})


def login_route(key: bytes) -> Callable[[Request], Awaitable[Response]]:
    """POST /login: the right key sets the page cookie and goes to the page; a wrong one shows the form again."""

    async def login(request: Request) -> Response:
        body = await request.body()
        given = parse_qs(body[:MAX_FORM_BYTES].decode("utf-8", "replace")).get("key", [""])[0]
        if not hmac.compare_digest(given.encode(), key):
            return login_form("That is not the API key.")
        response = RedirectResponse("/", 303)
        response.set_cookie(COOKIE, page_token(key), httponly=True, samesite="strict", path="/")
        return response

    return login
