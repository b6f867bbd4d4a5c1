"""Customer tokens: who is calling, when BOXOFFICE_CUSTOMER_TOKEN_SECRET is set.

Without the secret the service trusts the body's `customer_id` (a trusted backend calls
it). With it, a customer route needs `Authorization: Bearer <JWT>`: signed HS256 with the
secret, `sub` the customer id, `exp` in the future. Verification is local (no round trip)
and happens once per request, in the app's before-request hook (service/web/door.py), before
the body is read: a caller without a valid token gets 401 whatever it sent.

How a route takes part (the waiting room's routes too):

- register it in a router made with `customers.layer(tokens)`: marked `opt=ROUTE`, the
  hook verifies the token of every request to it (with the secret set), and the OpenAPI
  document declares the customer bearer scheme on it; add `errors.Unauthorized` and, when
  it takes a body's `customer_id`, `errors.CustomerMismatch` to its documented problems;
- `customers.of(request)`: the token's customer id, or None when tokens are off;
- `customers.body_customer(request, given)`: the customer a body acts for: `sub` when the
  body leaves `customer_id` out, 403 `customer_mismatch` when it names another;
- a record that belongs to a customer (hold, booking, queue ticket) is answered 404 as if
  it did not exist when `of(request)` is set and is not its customer: `owns(request, c)`.
"""

from __future__ import annotations

import time
from typing import Any, Final, cast

import jwt

from service.core import errors
from service.web.strictjson import storable

# Litestar route `opt` marking a customer route (see above).
ROUTE: Final[dict[str, Any]] = {"customer": True}
# Where the verified customer id waits for the handler, in the request's ASGI scope.
_SCOPE_KEY = "boxoffice.customer"
_ALGORITHMS = ["HS256"]  # the only one: never `none`, never a public-key algorithm
_OPTIONS: Any = {"require": ["exp", "sub"], "verify_exp": True, "verify_signature": True}
# The latest `exp` believed (9999-12-31T23:59:59Z, the last second RFC 3339 can write).
_LATEST_EXP = 253_402_300_799
_NEEDED = "a valid customer token is required: `Authorization: Bearer <JWT>`"
# Tokens verified lately, by their whole text: a buyer sends the same token with each of
# their requests, and decoding one with PyJWT costs about 40 us, a third of what a whole
# hold costs the API process (about 130 us). A hit is the very string whose signature was
# checked (with this process's one secret); only its `exp` is checked again. Bounded: the
# oldest is forgotten first.
_CACHE_SIZE = 10_000


def is_customer_route(opt: dict[str, Any]) -> bool:
    return bool(opt.get("customer"))


def layer(tokens: bool) -> dict[str, Any]:
    """The options of a router of customer routes (see above); `tokens`: the secret is set,
    so the routes require the customer scheme (without it they require nothing)."""
    return {"opt": ROUTE, "security": [{"customer": []}] if tokens else None}


class Verifier:
    """Checks the customer tokens of one secret."""

    def __init__(self, secret: str) -> None:
        self._key = secret.encode()
        self._verified: dict[str, tuple[str, float]] = {}  # token -> (sub, exp)

    def customer(self, authorization: bytes | None) -> str:
        """The customer id of an `Authorization` header's value; 401 for anything else."""
        if authorization is None:
            raise errors.Unauthorized(_NEEDED)
        scheme, _, token = authorization.decode("latin-1").partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise errors.Unauthorized(_NEEDED)
        known = self._verified.get(token)
        if known is not None and time.time() < known[1]:
            return known[0]
        sub, exp = self._verify(token)
        if len(self._verified) >= _CACHE_SIZE:
            del self._verified[next(iter(self._verified))]
        self._verified[token] = (sub, exp)
        return sub

    def _verify(self, token: str) -> tuple[str, float]:
        try:
            claims = jwt.decode(token, self._key, algorithms=_ALGORITHMS, options=_OPTIONS)
        except jwt.ExpiredSignatureError:
            raise errors.Unauthorized("the customer token has expired") from None
        except jwt.InvalidSignatureError:
            raise errors.Unauthorized("the customer token's signature is not valid") from None
        except jwt.InvalidAlgorithmError:
            raise errors.Unauthorized("a customer token must be signed HS256") from None
        except jwt.InvalidTokenError:
            raise errors.Unauthorized(f"not a valid customer token; {_NEEDED}") from None
        sub = claims.get("sub")
        # What a body's customer_id could be (schemas.CustomerId), and nothing PostgreSQL
        # could not store.
        if not isinstance(sub, str) or not 1 <= len(sub) <= 128 or not storable(sub):
            raise errors.Unauthorized("the token's `sub` must be a customer id of 1-128 characters")
        # PyJWT takes any number, and a string of digits, for `exp`; one that only a forger
        # would write (1e300, "1999999999", 1.5) is refused like any other bad token.
        exp = claims["exp"]
        if type(exp) is not int or not 0 < exp <= _LATEST_EXP:
            raise errors.Unauthorized(f"not a valid customer token; {_NEEDED}")
        return sub, float(exp)

    def check(self, scope: Any) -> None:
        """Verify the request's token and keep its customer for the handler."""
        authorization = None
        for name, value in scope["headers"]:
            if name == b"authorization":
                authorization = value
                break
        cast(dict[str, Any], scope)[_SCOPE_KEY] = self.customer(authorization)


def of(request: Any) -> str | None:
    """The verified customer of this request; None when customer tokens are off."""
    customer: str | None = request.scope.get(_SCOPE_KEY)
    return customer


def body_customer(request: Any, given: str | None) -> str | None:
    """Whom a body acts for: with tokens, the token's customer (a body that names another
    is 403); without, the body's own `customer_id` (None: the body left it out)."""
    customer = of(request)
    if customer is None:
        return given
    if given and given != customer:
        raise errors.CustomerMismatch("`customer_id` is not the customer of the token")
    return customer


def owns(request: Any, customer_id: str) -> bool:
    """Whether this request may see a record of `customer_id` (always, without tokens)."""
    customer = of(request)
    return customer is None or customer == customer_id
