"""A language-model judge behind any OpenAI-compatible chat endpoint, retried and cached.

    judge = Judge(JudgeConfig(base_url="https://api.openai.com/v1", model="gpt-4-0613"),
                  cache_path="OUT/judge_cache.jsonl")
    reply = judge.chat([{"role": "user", "content": "..."}], temperature=0.0, max_tokens=3)
    reply.content, reply.model

Requests go to `{base_url}/chat/completions` with the key from the environment variable the
config names (`Authorization: Bearer ...`). Rate limits (429), server errors (5xx), timeouts
and dropped connections are retried with exponential back-off (a `Retry-After` header is
honoured up to the cap); other HTTP errors fail at once with the server's message.

Every reply is appended to the cache file (one JSON line per request, keyed by a hash of
model, messages, temperature, max_tokens and, for a request asked again, the attempt) and
flushed at once, so a rerun, or a run
killed midway, never pays for the same request twice, and sampled judges (temperature > 0)
give the same verdicts on a rerun.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
import urllib.error
import urllib.request
from typing import Callable, Mapping, Optional, Sequence


class JudgeError(RuntimeError):
  """The judge could not be reached or refused the request."""


@dataclasses.dataclass(frozen=True)
class JudgeConfig:
  """base_url: the endpoint's API root (`.../v1`); model: the judge model's name there."""
  base_url: str
  model: str
  api_key_env: str = "OPENAI_API_KEY"
  max_attempts: int = 6
  backoff_s: float = 1.0
  max_backoff_s: float = 60.0
  timeout_s: float = 120.0

  def __post_init__(self):
    if not self.base_url.startswith(("http://", "https://")):
      raise ValueError(f"judge base_url {self.base_url!r} must start with http:// or https://")
    if not self.model:
      raise ValueError("name the judge model (e.g. gpt-4-0613)")
    if self.max_attempts < 1:
      raise ValueError(f"judge max_attempts={self.max_attempts} must be at least 1")


@dataclasses.dataclass(frozen=True)
class Reply:
  content: str
  model: str
  cached: bool = False


def request_key(model: str, messages: Sequence[Mapping[str, str]], temperature: float,
                max_tokens: int, attempt: int = 0) -> str:
  body = {"model": model, "messages": list(messages), "temperature": float(temperature),
          "max_tokens": int(max_tokens)}
  if attempt:
    body["attempt"] = attempt
  return hashlib.sha256(json.dumps(body, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def _retryable(error: Exception) -> bool:
  if isinstance(error, urllib.error.HTTPError):
    return error.code == 429 or error.code >= 500
  return isinstance(error, (urllib.error.URLError, TimeoutError, ConnectionError))


def _retry_after(error: Exception) -> Optional[float]:
  if isinstance(error, urllib.error.HTTPError) and error.headers is not None:
    try:
      return float(error.headers.get("Retry-After", ""))
    except ValueError:
      return None
  return None


class Judge:
  """Chat completions from the configured endpoint, with retries and an on-disk cache."""

  def __init__(self, config: JudgeConfig, cache_path: str, *,
               sleep: Callable[[float], None] = time.sleep):
    self.config, self.cache_path, self._sleep = config, cache_path, sleep
    self._key = os.environ.get(config.api_key_env)
    if not self._key:
      raise ValueError(f"the judge's API key is read from ${config.api_key_env}, which is not "
                       "set; export it (or name another variable with --judge-key-env)")
    self._cache = self._read_cache()
    self.requests_sent = 0

  def _read_cache(self) -> dict[str, dict]:
    cache = {}
    if os.path.isfile(self.cache_path):
      with open(self.cache_path, encoding="utf-8") as f:
        for line in f:
          try:
            entry = json.loads(line)
          except json.JSONDecodeError:
            continue  # a line cut short by a kill: that request is simply asked again
          cache[entry["key"]] = entry
    return cache

  def _remember(self, key: str, reply: Reply) -> None:
    entry = {"key": key, "content": reply.content, "model": reply.model}
    self._cache[key] = entry
    os.makedirs(os.path.dirname(os.path.abspath(self.cache_path)), exist_ok=True)
    with open(self.cache_path, "a", encoding="utf-8") as f:
      f.write(json.dumps(entry, ensure_ascii=False) + "\n")
      f.flush()
      os.fsync(f.fileno())

  def chat(self, messages: Sequence[Mapping[str, str]], *, temperature: float,
           max_tokens: int, attempt: int = 0) -> Reply:
    """`attempt` > 0 asks the same request again (a protocol re-asking a sampling judge
    whose reply it could not read): it is cached apart, not sent."""
    key = request_key(self.config.model, messages, temperature, max_tokens, attempt)
    if key in self._cache:
      hit = self._cache[key]
      return Reply(hit["content"], hit["model"], cached=True)
    reply = self._post({"model": self.config.model, "messages": list(messages),
                        "temperature": float(temperature), "max_tokens": int(max_tokens)})
    self._remember(key, reply)
    return reply

  def _post(self, body: dict) -> Reply:
    url = self.config.base_url.rstrip("/") + "/chat/completions"
    data = json.dumps(body).encode("utf-8")
    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {self._key}"}
    for attempt in range(self.config.max_attempts):
      self.requests_sent += 1
      try:
        request = urllib.request.Request(url, data=data, headers=headers, method="POST")
        with urllib.request.urlopen(request, timeout=self.config.timeout_s) as response:
          return _parse_reply(json.loads(response.read().decode("utf-8")), url)
      except Exception as e:  # pylint: disable=broad-except
        if not _retryable(e):
          raise JudgeError(f"judge request to {url} failed: {_describe(e)}") from None
        if attempt + 1 == self.config.max_attempts:
          raise JudgeError(f"judge request to {url} failed {self.config.max_attempts} times; "
                           f"last: {_describe(e)}") from None
        wait = min(self.config.max_backoff_s, self.config.backoff_s * 2 ** attempt)
        self._sleep(min(self.config.max_backoff_s, _retry_after(e) or wait))
    raise AssertionError("unreachable")


def _describe(error: Exception) -> str:
  if isinstance(error, urllib.error.HTTPError):
    detail = error.read().decode("utf-8", "replace")[:300] if error.fp else ""
    return f"HTTP {error.code} {error.reason} {detail}".strip()
  return f"{type(error).__name__}: {error}"


def _parse_reply(payload: Mapping, url: str) -> Reply:
  try:
    content = payload["choices"][0]["message"]["content"]
  except (KeyError, IndexError, TypeError):
    raise JudgeError(f"{url} answered without choices[0].message.content: "
                     f"{json.dumps(payload)[:300]}") from None
  return Reply(content or "", str(payload.get("model", "")))
