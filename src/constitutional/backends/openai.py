"""Backend over an OpenAI-compatible HTTP server (vLLM above all): the ``Backend`` protocol by HTTP.

Any generation or labelling model field of the config can be a server spec (``backends.spec.ServerSpec``)::

    critique_revise:
      model: {backend: openai, base_urls: [http://127.0.0.1:8000/v1], model: smollm2-135m-instruct}

and the stage runs unchanged: ``backends.load_backend`` returns this backend instead of the
in-process one.

The chat template. Chats are rendered *here*, with the model's own tokenizer and chat template
(``backends/template.py``, the same code as the in-process backend), and the token ids are sent to
the legacy ``/v1/completions`` endpoint. So the server sees exactly the tokens the in-process
backend would run, special tokens included, and an assistant turn left open (chain-of-thought
labels continue one) stays open. ``/v1/chat/completions`` is not used: the server would apply its
own copy of the template, which nothing here can check is the same. ``prompt_format: text`` sends
the rendered text instead, for servers that take only strings (they may tokenise it differently).

Sampling: one request per chat, ``max_in_flight`` of them at once (the server batches them), each
sent to the base URL with the fewest requests in flight. Every sampling parameter is sent
explicitly (temperature, top_p, top_k disabled, no repetition penalty, the same stop tokens), so a
server's own defaults cannot change what a request means. With ``SamplingParams.seed`` set, chat
``i`` of a call is sampled with seed ``seed + i``.

Scoring (contrast scores, multiple-choice options, evaluation) needs the log-probabilities of
*prompt* tokens: vLLM's ``prompt_logprobs`` extension, else the legacy OpenAI ``echo`` with
``logprobs``. Verify, don't trust: before the first scoring request to a server, a fixed probe
chat is continued greedily with the log-probabilities of the sampled tokens, then the same tokens
are scored as a prompt; the two readings of the same numbers must agree within
``PROBE_TOLERANCE`` nats per token. A server that offers no prompt log-probabilities, or fails the
check (llama.cpp's server gave -13.9 for a token whose log-probability is -3.1), is refused for
scoring with one error naming the server and the reason; it can still generate.

Failures: a timeout, a connection error, HTTP 5xx, 408 or 429 is retried ``retries`` times with
exponential backoff (``backoff`` seconds, doubled each time, at most 30), on the least busy URL
that has not just failed; any other 4xx fails at once with the server's message. After the last
retry the call raises one ``CaiError`` naming the URL. The API key is read from the environment
variable the spec names and only ever put into the ``Authorization`` header.
"""

from __future__ import annotations

import http.client
import json
import math
import os
import socket
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor, as_completed
from pathlib import Path
from types import SimpleNamespace
from urllib.parse import urlsplit

from constitutional.backends import template
from constitutional.backends.base import Chat, Completion, ProgressFn, SamplingParams, TokenLogprobs
from constitutional.errors import CaiError, register_secret
from constitutional.models import resolve_model
from constitutional.progress import log, no_hf_bars

# The probe: a fixed chat, continued greedily for PROBE_TOKENS tokens, whose sampled-token
# log-probabilities must match its prompt log-probabilities within PROBE_TOLERANCE nats a token.
PROBE_CHAT = [{"role": "user", "content": "Name three colours of the rainbow, then say why the sky is blue."}]
PROBE_TOKENS = 12
PROBE_TOLERANCE = 0.05
BACKOFF_MAX = 30.0
_RETRY_STATUS = {408, 429}


class ServerError(CaiError):
    """A request that failed for good (4xx, or retries used up); the message names the server."""


class OpenAIBackend(template.LocalTemplate):
    """A model served over HTTP behind the :class:`~constitutional.backends.base.Backend` protocol.

    ``spec`` is a :class:`constitutional.backends.spec.ServerSpec`. Construction loads the tokenizer and
    asks the servers which models they serve (retrying as any request does), so an unreachable
    server or a wrong model name fails here, before a stage starts its work.
    """

    def __init__(self, spec, *, name: str | None = None, tokenizer=None):
        self.spec = spec
        self.name = name or spec.model
        self.tokenizer = tokenizer if tokenizer is not None else _load_tokenizer(spec)
        self.stop_ids = template.stop_token_ids(_generation_config(spec), self.tokenizer)
        headers = {"Content-Type": "application/json"}
        key = read_api_key(spec)
        if key is not None:
            headers["Authorization"] = f"Bearer {key}"
        self.pool = HttpPool(spec.base_urls, headers, timeout=spec.timeout, retries=spec.retries,
                             backoff=spec.backoff)
        self._executor = ThreadPoolExecutor(spec.max_in_flight, thread_name_prefix="cai-http")
        self._scoring: dict[str, str] = {}  # base URL -> "prompt_logprobs" | "echo", once probed
        self._probe_lock = threading.Lock()
        self.context_length = self._served_context_length()

    def __repr__(self) -> str:  # never shows the headers (the API key)
        return f"OpenAIBackend(model={self.spec.model!r}, base_urls={self.spec.base_urls!r})"

    # ------------------------------------------------------------------ text

    def _prompt(self, ids: list[int]):
        """What goes into a request's ``prompt``: the token ids, or their text for ``prompt_format: text``."""
        if self.spec.prompt_format == "text":
            return self.tokenizer.decode(ids)
        return ids

    # ------------------------------------------------------------ generation

    def generate(self, chats: Sequence[Chat], params: SamplingParams,
                 progress: ProgressFn | None = None) -> list[Completion]:
        bodies = []
        for i, chat in enumerate(chats):
            body = self._sampling_body(self._encode(self.render(chat)), params.max_new_tokens,
                                       params.temperature, params.top_p)
            if params.seed is not None:
                body["seed"] = params.seed + i
            if params.min_new_tokens:
                body["min_tokens"] = params.min_new_tokens
            bodies.append(body)

        def done(i: int, result: dict) -> None:
            if progress is not None:
                progress(1, _completion(result).tokens)

        return [_completion(r) for r in self._map("/completions", bodies, done)]

    def _sampling_body(self, ids: list[int], max_tokens: int, temperature: float, top_p: float) -> dict:
        sampling = temperature > 0
        return {"model": self.spec.model, "prompt": self._prompt(ids), "max_tokens": max_tokens,
                "temperature": temperature if sampling else 0.0, "top_p": top_p if sampling else 1.0,
                "top_k": -1, "repetition_penalty": 1.0, "stop_token_ids": self.stop_ids,
                "skip_special_tokens": True, "n": 1}

    # --------------------------------------------------------------- scoring

    def logprobs(self, pairs: Sequence[tuple[str, str]]) -> list[TokenLogprobs]:
        """Token log-probs of each continuation after its prompt (tokenised as the in-process backend does)."""
        items = []
        for prompt, continuation in pairs:
            head = self._encode(prompt)
            items.append((head, template.continuation_ids(self.tokenizer, prompt, head, continuation)))
        values = self._score_ids(items)
        return [TokenLogprobs(tokens=self.tokenizer.convert_ids_to_tokens(tail), logprobs=v)
                for (_, tail), v in zip(items, values, strict=True)]

    def option_logprobs(self, prompts: Sequence[str], options: Sequence[str]) -> list[list[float]]:
        """For each prompt: the log-probability of each option's first distinguishing token, read
        after the options' shared tokens (the same numbers as the in-process backend's)."""
        items, shape = [], []
        for prompt in prompts:
            shared, firsts = template.option_tokens(self.tokenizer, prompt, options)
            head = self._encode(prompt) + shared
            items += [(head, [first]) for first in firsts]
            shape.append(len(firsts))
        values = self._score_ids(items)
        out, k = [], 0
        for n in shape:
            out.append([values[k + j][0] for j in range(n)])
            k += n
        return out

    def _score_ids(self, items: list[tuple[list[int], list[int]]]) -> list[list[float]]:
        """Log-probabilities of each tail's tokens after its head, from the servers' prompt log-probs."""
        self._verify_scoring()
        kinds = set(self._scoring.values())
        if len(kinds) != 1:
            raise CaiError(f"model servers {', '.join(self.spec.base_urls)}: they offer prompt log-probabilities in "
                           f"different ways ({', '.join(sorted(kinds))}); list servers of one kind")
        kind = kinds.pop()
        bodies = [self._scoring_body(head + tail, kind) for head, tail in items]
        results = self._map("/completions", bodies)
        out = []
        for (head, tail), result in zip(items, results, strict=True):
            values = _prompt_logprobs(result, kind, head + tail)
            if values is None:
                raise ServerError(f"model server {', '.join(self.spec.base_urls)}: a scoring answer has no prompt "
                                  f"log-probabilities")
            out.append(values[len(head):len(head) + len(tail)])
        return out

    def _scoring_body(self, ids: list[int], kind: str) -> dict:
        body = {"model": self.spec.model, "prompt": self._prompt(ids), "max_tokens": 1, "temperature": 0.0}
        if kind == "prompt_logprobs":
            body["prompt_logprobs"] = 0
        else:
            body.update(echo=True, logprobs=1)
        return body

    def _verify_scoring(self) -> None:
        """Probe every server once before its first scoring request; refuse any that fails."""
        with self._probe_lock:
            for url in self.spec.base_urls:
                if url not in self._scoring:
                    self._scoring[url] = self._probe(url)

    def _probe(self, url: str) -> str:
        """Check a server's prompt log-probabilities against its own sampled-token log-probabilities.

        Returns how it offers prompt log-probabilities (``prompt_logprobs`` or ``echo``); raises a
        ``CaiError`` naming the server and the reason otherwise.
        """
        head = self._encode(self.render(PROBE_CHAT))
        body = self._sampling_body(head, PROBE_TOKENS, 0.0, 1.0)
        body.update(logprobs=1, return_tokens_as_token_ids=True)
        sampled = self.pool.request("POST", "/completions", body, url=url)
        choice = (sampled.get("choices") or [{}])[0]
        sampled_lp = [x for x in ((choice.get("logprobs") or {}).get("token_logprobs") or []) if x is not None]
        tail = self._sampled_ids(choice, len(sampled_lp))
        refuse = f"model server {url} ({self.spec.model}) is refused for scoring"
        if not sampled_lp or tail is None:
            raise CaiError(f"{refuse}: it returns no log-probabilities of sampled tokens to check its prompt "
                           f"log-probabilities against")
        tail, sampled_lp = tail[:len(sampled_lp)], sampled_lp[:len(tail)]
        for kind in ("prompt_logprobs", "echo"):
            answer = self.pool.request("POST", "/completions", self._scoring_body(head + tail, kind), url=url)
            values = _prompt_logprobs(answer, kind, head + tail)
            if values is None:
                continue
            prompt_lp = values[len(head):len(head) + len(tail)]
            if len(prompt_lp) != len(tail) or any(v is None or not math.isfinite(v) for v in prompt_lp):
                raise CaiError(f"{refuse}: its {kind} answer does not cover the probe's {len(tail)} tokens")
            gaps = [abs(a - b) for a, b in zip(prompt_lp, sampled_lp, strict=True)]
            worst = max(range(len(gaps)), key=gaps.__getitem__)
            if gaps[worst] > PROBE_TOLERANCE:
                token = self.tokenizer.decode([tail[worst]])
                raise CaiError(f"{refuse}: its prompt log-probabilities ({kind}) disagree with its own sampled-token "
                               f"log-probabilities on a probe text: {prompt_lp[worst]:.3f} vs {sampled_lp[worst]:.3f} "
                               f"for token {token!r} (tolerance {PROBE_TOLERANCE})")
            log(f"{url}: prompt log-probabilities ({kind}) agree with sampled ones within "
                 f"{max(gaps):.4f} nats a token on the probe; scoring through this server")
            return kind
        raise CaiError(f"{refuse}: it offers no prompt log-probabilities (neither vLLM's prompt_logprobs nor "
                       f"echo with logprobs); use vLLM, or score with an in-process model")

    def _sampled_ids(self, choice: dict, n: int) -> list[int] | None:
        """The ids of the probe's sampled tokens: from ``token_id:N`` strings (vLLM's
        ``return_tokens_as_token_ids``), else the sampled text re-tokenised if the counts match."""
        tokens = (choice.get("logprobs") or {}).get("tokens") or []
        if tokens and all(isinstance(t, str) and t.startswith("token_id:") for t in tokens):
            return [int(t.split(":", 1)[1]) for t in tokens]
        ids = self._encode(choice.get("text") or "")
        return ids if ids and len(ids) == n else None

    # ----------------------------------------------------------------- plumbing

    def _map(self, path: str, bodies: list[dict], on_done=None) -> list[dict]:
        """POST every body, ``max_in_flight`` at once; results in order. The first request that
        fails for good cancels the rest and raises its error."""
        if not bodies:
            return []
        abort = threading.Event()
        futures: list[Future] = [self._executor.submit(self.pool.request, "POST", path, b, abort=abort)
                                 for b in bodies]
        index = {f: i for i, f in enumerate(futures)}
        try:
            for f in as_completed(futures):
                result = f.result()  # raises the request's error
                if on_done is not None:
                    on_done(index[f], result)
        except BaseException:
            abort.set()
            for f in futures:
                f.cancel()
            raise
        return [f.result() for f in futures]

    def _served_context_length(self) -> int:
        listing = self.pool.request("GET", "/models")
        served = {m.get("id"): m for m in listing.get("data") or [] if isinstance(m, dict)}
        if self.spec.model not in served:
            names = ", ".join(sorted(str(n) for n in served)) or "none"
            raise CaiError(f"model server {self.spec.base_urls[0]}: does not serve {self.spec.model!r} "
                           f"(it serves: {names}); set model to one of them")
        length = served[self.spec.model].get("max_model_len")
        if isinstance(length, int) and length > 0:
            return length
        length = getattr(self.tokenizer, "model_max_length", None)
        return length if isinstance(length, int) and 0 < length < 10**7 else 2048

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
        self.pool.close()


def _completion(result: dict) -> Completion:
    choice = result["choices"][0]
    usage = result.get("usage") or {}
    tokens = usage.get("completion_tokens")
    if not isinstance(tokens, int):
        tokens = len((choice.get("logprobs") or {}).get("tokens") or []) or 0
    return Completion(text=(choice.get("text") or "").strip(), tokens=tokens,
                      finished=choice.get("finish_reason") == "stop")


def _prompt_logprobs(result: dict, kind: str, ids: list[int]) -> list[float | None] | None:
    """Per-position log-probabilities of the prompt ``ids`` in a completions answer (None at
    position 0, which nothing predicts), or None if the answer has none.

    >>> _prompt_logprobs({"choices": [{"prompt_logprobs": [None, {"7": {"logprob": -1.5}}]}]},
    ...                  "prompt_logprobs", [3, 7])
    [None, -1.5]
    >>> _prompt_logprobs({"choices": [{"logprobs": {"token_logprobs": [None, -2.0, -0.1]}}]}, "echo", [3, 7])
    [None, -2.0]
    """
    choice = (result.get("choices") or [{}])[0]
    if kind == "prompt_logprobs":
        entries = choice.get("prompt_logprobs")
        if not isinstance(entries, list) or len(entries) < len(ids):
            return None
        values: list[float | None] = [None]
        for pos in range(1, len(ids)):
            entry = entries[pos] or {}
            hit = entry.get(str(ids[pos]))
            values.append(float(hit["logprob"]) if isinstance(hit, dict) and "logprob" in hit else None)
        return values
    token_logprobs = (choice.get("logprobs") or {}).get("token_logprobs")
    if not isinstance(token_logprobs, list) or len(token_logprobs) < len(ids):
        return None
    return [None] + [None if v is None else float(v) for v in token_logprobs[1:len(ids)]]


# --------------------------------------------------------------------- HTTP


def read_api_key(spec) -> str | None:
    """The API key from the environment variable ``spec.api_key_env`` (None when the spec names none).

    Surrounding whitespace (a trailing ``\\r`` of a key pasted from a Windows file) is stripped; a key
    that is empty or holds anything but printable ASCII is refused, naming the variable, never the key.
    The key is registered with ``errors.redact``, so no message the tool prints or stores can hold it.
    """
    if not spec.api_key_env:
        return None
    name = spec.api_key_env
    if name not in os.environ and len(name) >= 20 and not name.isupper():  # the key itself, pasted by mistake
        register_secret(name)
        raise CaiError(f"model server {spec.model!r}: api_key_env holds what looks like an API key, not the name of "
                       f"an environment variable (the value is not shown): put the key in a variable and name it")
    raw = os.environ.get(name)
    if raw:
        register_secret(raw)
    key = (raw or "").strip()
    if not key:
        raise CaiError(f"model server {spec.model!r}: environment variable {spec.api_key_env} (api_key_env) "
                       f"is {'empty' if raw is not None else 'not set'}")
    if not all(33 <= ord(c) <= 126 for c in key):
        raise CaiError(f"model server {spec.model!r}: environment variable {spec.api_key_env} (api_key_env) holds "
                       f"a character that cannot be sent in a header (a control character, space or non-ASCII "
                       f"letter inside the key; the key is not shown)")
    return key


def check_reachable(spec, key: str, timeout: float = 5.0) -> None:
    """Fail fast if a server does not answer: one ``GET /models`` to each base URL, no retries.

    For checks before a run writes anything (an unreachable server is otherwise found only after the
    request retries, a minute or more later). Any HTTP answer counts as reachable; the API key is not sent.
    """
    pool = HttpPool(spec.base_urls, {"Content-Type": "application/json"}, timeout=timeout, retries=0)
    try:
        for url in pool.base_urls:
            try:
                status, _ = pool._send(url, "GET", "/models", None)
            except (OSError, http.client.HTTPException) as e:
                raise CaiError(f"{key}: model server {url} is unreachable ({_describe(e)})") from None
            if status >= 500:
                raise CaiError(f"{key}: model server {url} answered HTTP {status} to GET /models")
    finally:
        pool.close()


class HttpPool:
    """JSON requests to several base URLs, with retries, backoff and least-busy routing.

    Thread-safe: each thread keeps one keep-alive connection per base URL. A URL that just
    failed is avoided until its backoff has passed, unless every URL is failing.
    """

    def __init__(self, base_urls: Sequence[str], headers: dict, timeout: float = 600, retries: int = 6,
                 backoff: float = 1.0):
        self.base_urls = [u.rstrip("/") for u in base_urls]
        self.headers = headers
        self.timeout = timeout
        self.retries = retries
        self.backoff = backoff
        self.in_flight = dict.fromkeys(self.base_urls, 0)
        self.sent = dict.fromkeys(self.base_urls, 0)  # requests sent to each URL (tests read it)
        self._avoid_until = dict.fromkeys(self.base_urls, 0.0)
        self._lock = threading.Lock()
        self._turn = 0
        self._local = threading.local()

    def request(self, method: str, path: str, body: dict | None = None, url: str | None = None,
                abort: threading.Event | None = None) -> dict:
        """The decoded JSON answer. ``url`` pins the request to one base URL."""
        failures: list[tuple[str, str]] = []
        for attempt in range(self.retries + 1):
            if abort is not None and abort.is_set():
                raise ServerError("cancelled: another request failed")
            base = self._acquire(url.rstrip("/") if url else None, failures[-1][0] if failures else None)
            try:
                status, data = self._send(base, method, path, body)
            except (OSError, http.client.HTTPException) as e:  # timeouts, refused/reset connections
                self._drop_connection(base)
                failures.append((base, _describe(e)))
            except ValueError as e:  # http.client refuses a header value: its message would hold the header
                self._drop_connection(base)
                raise ServerError(f"model server {base}: the request could not be sent ({type(e).__name__} in "
                                  f"its headers; check the API key's environment variable)") from None
            else:
                if status < 300:
                    try:
                        return json.loads(data)
                    except ValueError:
                        failures.append((base, f"HTTP {status} with a body that is not JSON"))
                elif status >= 500 or status in _RETRY_STATUS:
                    failures.append((base, f"HTTP {status}: {_server_message(data)}"))
                else:
                    raise ServerError(f"model server {base}: HTTP {status} for {method} {path}: "
                                      f"{_server_message(data)}")
            finally:
                self._release(base)
            delay = min(BACKOFF_MAX, self.backoff * 2 ** attempt)
            with self._lock:
                self._avoid_until[base] = time.monotonic() + delay
            if attempt < self.retries:
                if abort is not None:
                    if abort.wait(delay):
                        raise ServerError("cancelled: another request failed")
                else:
                    time.sleep(delay)
        urls = list(dict.fromkeys(u for u, _ in failures))
        raise ServerError(f"model server {', '.join(urls)}: {failures[-1][1]} "
                          f"(gave up after {len(failures)} attempts over {self._waited(len(failures)):.0f} s)")

    def _waited(self, attempts: int) -> float:
        return sum(min(BACKOFF_MAX, self.backoff * 2 ** a) for a in range(attempts - 1))

    def _acquire(self, pinned: str | None, last_failed: str | None = None) -> str:
        with self._lock:
            if pinned is not None:
                base = pinned
            else:
                now = time.monotonic()
                healthy = [u for u in self.base_urls if self._avoid_until[u] <= now and u != last_failed]
                choices = healthy or sorted(self.base_urls, key=self._avoid_until.__getitem__)[:1]
                # fewest in flight; ties go round-robin so an idle pool still spreads its load
                self._turn += 1
                n = len(self.base_urls)
                base = min(choices, key=lambda u: (self.in_flight[u], (self.base_urls.index(u) - self._turn) % n))
            self.in_flight[base] = self.in_flight.get(base, 0) + 1
            self.sent[base] = self.sent.get(base, 0) + 1
            return base

    def _release(self, base: str) -> None:
        with self._lock:
            self.in_flight[base] -= 1

    def _connection(self, base: str) -> tuple[http.client.HTTPConnection, str]:
        conns = self._local.__dict__.setdefault("conns", {})
        if base not in conns:
            parts = urlsplit(base)
            cls = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
            conns[base] = (cls(parts.hostname, parts.port, timeout=self.timeout), parts.path.rstrip("/"))
        return conns[base]

    def _drop_connection(self, base: str) -> None:
        conns = self._local.__dict__.get("conns", {})
        conn = conns.pop(base, None)
        if conn is not None:
            conn[0].close()

    def _send(self, base: str, method: str, path: str, body: dict | None) -> tuple[int, bytes]:
        conn, prefix = self._connection(base)
        payload = None if body is None else json.dumps(body).encode()
        conn.request(method, prefix + path, body=payload, headers=self.headers)
        response = conn.getresponse()
        data = response.read()
        if response.will_close:
            self._drop_connection(base)
        return response.status, data

    def close(self) -> None:
        self._drop_connection_all()

    def _drop_connection_all(self) -> None:
        for conn, _ in self._local.__dict__.get("conns", {}).values():
            conn.close()
        self._local.__dict__["conns"] = {}


def _describe(error: BaseException) -> str:
    """A short reason for a transport failure.

    >>> _describe(ConnectionRefusedError(111, "Connection refused"))
    'connection refused'
    >>> _describe(TimeoutError("timed out"))
    'timed out'
    """
    if isinstance(error, ConnectionRefusedError):
        return "connection refused"
    if isinstance(error, TimeoutError | socket.timeout):
        return "timed out"
    if isinstance(error, socket.gaierror):
        return f"host not found ({error.strerror or error})"
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0]


def _server_message(data: bytes) -> str:
    """The error text of a server's answer: OpenAI's ``{"error": {"message": ...}}`` or the raw body.

    >>> _server_message(b'{"error": {"message": "model x does not exist"}}')
    'model x does not exist'
    >>> _server_message(b'{"detail": "Not Found"}')
    'Not Found'
    """
    text = data.decode("utf-8", errors="replace").strip()
    try:
        parsed = json.loads(text)
    except ValueError:
        parsed = None
    if isinstance(parsed, dict):
        err = parsed.get("error")
        if isinstance(err, dict) and err.get("message"):
            text = str(err["message"])
        elif isinstance(err, str):
            text = err
        elif parsed.get("message") or parsed.get("detail"):
            text = str(parsed.get("message") or parsed.get("detail"))
    text = " ".join(text.split())
    return (text[:300] + "...") if len(text) > 300 else (text or "(empty answer)")


def _load_tokenizer(spec):
    """The tokenizer that renders chats for the server: ``spec.tokenizer``, else ``spec.model``."""
    from transformers import AutoTokenizer

    source = spec.tokenizer or spec.model
    try:
        path = resolve_model(source)
    except CaiError as e:
        raise CaiError(f"model server {spec.model!r}: no tokenizer to render chats with ({e}); set tokenizer "
                       f"to a local copy of the served model's tokenizer") from None
    try:
        with no_hf_bars():
            return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CaiError(f"model server {spec.model!r}: could not load the tokenizer {source!r}: {first}; set "
                       f"tokenizer to a local copy of the served model's tokenizer") from None


def _generation_config(spec):
    """The served model's end-of-reply ids as the in-process backend reads them: from
    generation_config.json, else config.json, beside the tokenizer (None if neither is there)."""


    try:
        path = Path(resolve_model(spec.tokenizer or spec.model))
    except CaiError:
        return None
    for name in ("generation_config.json", "config.json"):
        try:
            data = json.loads((path / name).read_text())
        except (OSError, ValueError):
            continue
        if isinstance(data, dict) and data.get("eos_token_id") is not None:
            return SimpleNamespace(eos_token_id=data["eos_token_id"])
    return None
