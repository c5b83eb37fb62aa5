"""Talking to a teacher LLM behind an OpenAI-compatible endpoint: one job-wide rate limit, retries, a response cache.

- `RateLimiter` runs as one named Ray actor for the whole job; every client reserves a slot from it before each
  request, so the limits hold over all actors on all nodes.
- `Teacher.ask` sends one chat request with our own retries (exponential backoff with jitter, `Retry-After`
  honoured); the openai client's own retries are off so that every attempt passes the rate limit.
- `ResponseCache` keeps each successful answer under a hash of (model, prompt version, sampling settings, passage).
"""

from __future__ import annotations

import asyncio
import email.utils
import hashlib
import json
import random
import time
import uuid
from dataclasses import asdict, dataclass

from uniner import storage
from uniner.errors import UserError
from uniner.formats import TEACHER_INSTRUCTIONS, TEACHER_SYSTEM, teacher_messages

PLACEHOLDER_KEY = "no-key"
BACKOFF_START_S = 1.0
BACKOFF_MAX_S = 60.0


def prompt_version(variant: str) -> str:
    """Names the exact prompt: the variant plus a hash of its strings, so a changed prompt never reuses answers."""
    digest = hashlib.sha1(f"{TEACHER_SYSTEM}\x00{TEACHER_INSTRUCTIONS[variant]}".encode()).hexdigest()[:8]
    return f"{variant}-{digest}"


def estimate_tokens(text: str) -> int:
    """Prompt tokens by the chars/4 rule (no tokenizer of the teacher is at hand)."""
    return max(1, (len(text) + 3) // 4)


def prompt_tokens(passage: str, variant: str) -> int:
    return sum(estimate_tokens(m["content"]) for m in teacher_messages(passage, variant=variant)) + 8


class Secret:
    """An API key that never shows itself in reprs, logs or tracebacks."""

    def __init__(self, value: str):
        self._value = value

    def reveal(self) -> str:
        return self._value

    def redact(self, text: str) -> str:
        return text.replace(self._value, "***") if self._value else text

    def __repr__(self) -> str:
        return "Secret(***)"


class RateLimiter:
    """Requests per minute and tokens per minute for the whole job, as spacing between request start times.

    Each limit is a reservation bucket with no burst: a request may start 60/rpm seconds after the previous one,
    and a request costing c tokens holds the token budget for c/(tpm/60) seconds, so the job never runs above either
    rate. `reserve` answers the wall-clock time at which the caller may send (an absolute time, so that the latency
    of the answer itself cannot bring two requests closer); reservations are never given back.
    """

    def __init__(self, requests_per_minute: float, tokens_per_minute: float):
        self.request_interval = 60.0 / requests_per_minute
        self.seconds_per_token = 60.0 / tokens_per_minute
        self.next_request_at = 0.0
        self.next_tokens_at = 0.0

    def reserve(self, tokens: int) -> float:
        start = max(time.time(), self.next_request_at, self.next_tokens_at)
        self.next_request_at = start + self.request_interval
        self.next_tokens_at = start + tokens * self.seconds_per_token
        return start


@dataclass
class Answer:
    """One teacher reply (or the error that ended the tries)."""

    content: str = ""
    refusal: str = ""
    finish_reason: str = ""
    input_tokens: int = 0
    output_tokens: int = 0
    error: str = ""
    attempts: int = 0
    from_cache: bool = False


class ResponseCache:
    """Hash-keyed JSON entries under a local or s3:// folder; writes go to a temporary name first."""

    def __init__(self, uri: str, *, s3_endpoint_url: str = ""):
        self.root = storage.locate(uri, s3_endpoint_url=s3_endpoint_url) if uri else None
        if self.root and not self.root.is_s3:
            self.root.fs.create_dir(self.root.path, recursive=True)

    @staticmethod
    def key(*, model: str, prompt_version: str, temperature: float, max_tokens: int, passage: str) -> str:
        identity = json.dumps([model, prompt_version, temperature, max_tokens, passage], ensure_ascii=False)
        return hashlib.sha256(identity.encode()).hexdigest()

    def _entry(self, key: str) -> storage.Location:
        return self.root.join(key[:2], f"{key}.json")

    def get(self, key: str) -> Answer | None:
        if self.root is None:
            return None
        try:
            with self.root.fs.open_input_stream(self._entry(key).path) as stream:
                return Answer(**{**json.loads(stream.read()), "from_cache": True, "attempts": 0})
        except (OSError, ValueError, TypeError):
            return None

    def put(self, key: str, answer: Answer) -> None:
        if self.root is None:
            return
        entry = self._entry(key)
        data = json.dumps({k: v for k, v in asdict(answer).items() if k not in ("from_cache", "attempts")}).encode()
        if entry.is_s3:  # an S3 object appears whole or not at all
            with entry.fs.open_output_stream(entry.path) as stream:
                stream.write(data)
            return
        entry.fs.create_dir(entry.path.rsplit("/", 1)[0], recursive=True)
        staging = f"{entry.path}.{uuid.uuid4().hex[:8]}.tmp"
        with entry.fs.open_output_stream(staging) as stream:
            stream.write(data)
        entry.fs.move(staging, entry.path)


def retry_after_s(error: Exception) -> float | None:
    """Seconds the server asked us to wait (`retry-after-ms`, `retry-after` in seconds or as an HTTP date)."""
    response = getattr(error, "response", None)
    headers = getattr(response, "headers", None) or {}
    try:
        if headers.get("retry-after-ms"):
            return float(headers["retry-after-ms"]) / 1000
        value = headers.get("retry-after")
        if not value:
            return None
        try:
            return float(value)
        except ValueError:
            return max(0.0, email.utils.parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return None


def backoff_s(attempt: int, error: Exception) -> float:
    """Exponential backoff with full jitter, but never shorter than the server's Retry-After."""
    jittered = random.uniform(0, min(BACKOFF_MAX_S, BACKOFF_START_S * 2**attempt))
    asked = retry_after_s(error)
    return max(asked + random.uniform(0, 0.1 * asked + 0.05), jittered) if asked is not None else jittered


class Teacher:
    """An `openai.AsyncOpenAI` client with the job's rate limit, our retries and the response cache."""

    def __init__(
        self,
        *,
        base_url: str,
        model: str,
        api_key: Secret,
        variant: str,
        temperature: float,
        max_tokens: int,
        timeout_s: float,
        max_retries: int,
        limiter,
        cache: ResponseCache,
        api_key_env: str,
    ):
        import openai

        self.openai = openai
        self.client = openai.AsyncOpenAI(
            base_url=base_url, api_key=api_key.reveal() or PLACEHOLDER_KEY, timeout=timeout_s, max_retries=0
        )
        self.api_key = api_key
        self.api_key_env = api_key_env
        self.base_url = base_url
        self.model, self.variant, self.temperature, self.max_tokens = model, variant, temperature, max_tokens
        self.max_retries = max_retries
        self.limiter = limiter
        self.cache = cache
        self.version = prompt_version(variant)
        self.reached = False  # whether any request of this client got an HTTP answer

    async def ask(self, passage: str) -> Answer:
        """The teacher's answer for one passage, from the cache when the same question was answered before."""
        key = ResponseCache.key(
            model=self.model,
            prompt_version=self.version,
            temperature=self.temperature,
            max_tokens=self.max_tokens,
            passage=passage,
        )
        cached = await asyncio.to_thread(self.cache.get, key)
        if cached is not None:
            return cached
        answer = await self._request(passage)
        if not answer.error:
            await asyncio.to_thread(self.cache.put, key, answer)
        return answer

    async def _request(self, passage: str) -> Answer:
        openai = self.openai
        retryable = (
            openai.RateLimitError,
            openai.InternalServerError,
            openai.APITimeoutError,
            openai.APIConnectionError,
        )
        messages = teacher_messages(passage, variant=self.variant)
        cost = prompt_tokens(passage, self.variant) + self.max_tokens
        for attempt in range(self.max_retries + 1):
            send_at = await self.limiter.reserve.remote(cost)
            await asyncio.sleep(max(0.0, send_at - time.time()))
            try:
                response = await self.client.chat.completions.create(
                    model=self.model, messages=messages, temperature=self.temperature, max_tokens=self.max_tokens
                )
            except retryable as error:
                if attempt < self.max_retries:
                    await asyncio.sleep(backoff_s(attempt, error))
                    continue
                described = self._describe(error, f"after {attempt + 1} attempts")
                if isinstance(error, openai.APIConnectionError) and not self.reached:
                    # An endpoint that never answered is down or mistyped: every passage would burn its retries.
                    raise UserError(
                        f"the teacher endpoint {self.base_url} cannot be reached ({described}): check "
                        "--base-url and that the server is up, then run the same command again"
                    ) from None
                return Answer(error=described, attempts=attempt + 1)
            except (openai.AuthenticationError, openai.PermissionDeniedError, openai.NotFoundError) as error:
                # The whole job would fail the same way: stop it with the fix instead of filling the output with errors.
                raise UserError(
                    f"the teacher endpoint {self.base_url} refused the request ({self._describe(error)}): "
                    f"check --model, --base-url and the key in ${self.api_key_env}"
                ) from None
            except openai.APIError as error:  # 400 and other answers that a retry would not change
                self.reached = True
                return Answer(error=self._describe(error), attempts=attempt + 1)
            self.reached = True
            if not getattr(response, "choices", None):  # e.g. a proxy's HTML page with status 200
                body = self.api_key.redact(" ".join(str(response).split())[:120])
                return Answer(
                    error=f"the endpoint answered with something that is not a chat completion: {body!r}",
                    attempts=attempt + 1,
                )
            return self._answer(response, attempt + 1)
        raise AssertionError("unreachable: the last attempt returns")

    def _answer(self, response, attempts: int) -> Answer:
        choice = response.choices[0] if response.choices else None
        message = choice.message if choice else None
        usage = response.usage
        return Answer(
            content=(message.content or "") if message else "",
            refusal=(getattr(message, "refusal", None) or "") if message else "",
            finish_reason=(choice.finish_reason or "") if choice else "",
            input_tokens=usage.prompt_tokens if usage else 0,
            output_tokens=usage.completion_tokens if usage else 0,
            attempts=attempts,
        )

    def _describe(self, error: Exception, suffix: str = "") -> str:
        status = getattr(error, "status_code", None)
        text = " ".join(str(getattr(error, "message", None) or error).split())[:300]
        described = f"{type(error).__name__}{f' {status}' if status else ''}: {text}" + (
            f" ({suffix})" if suffix else ""
        )
        return self.api_key.redact(described)


def local_cache_uri() -> str:
    from uniner.models import cache_dir

    return str(cache_dir() / "teacher-responses")
