"""Schemathesis hooks: every error response uses OpenAI's error body."""

import schemathesis


@schemathesis.check
def openai_error_format(ctx, response, case):
    if response.status_code >= 400:
        body = response.json()
        assert set(body) == {"error"}, f"error body {body!r} is not {{'error': ...}}"
        assert {"message", "type", "param", "code"} <= set(body["error"]), body
