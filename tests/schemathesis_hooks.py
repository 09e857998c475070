"""Loaded by schemathesis (SCHEMATHESIS_HOOKS=tests.schemathesis_hooks): image bodies from
tests/image_strategies.py instead of arbitrary bytes, so the fuzzer reaches inference (200s, checked against
the response schema) as well as every refusal path."""

from __future__ import annotations

import schemathesis

from service.decode import MEDIA_TYPES
from tests.image_strategies import hostile_images

for media in MEDIA_TYPES:
    schemathesis.openapi.media_type(media, hostile_images())
schemathesis.openapi.format("binary", hostile_images())  # the multipart `image` field
