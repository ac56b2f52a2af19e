"""A small OpenAI-compatible server for unit tests of the HTTP backend, backed by a real tiny model.

It answers ``GET /v1/models`` and ``POST /v1/completions`` the way vLLM does (token-id prompts,
``logprobs`` of sampled tokens, ``prompt_logprobs``, ``echo``), computing every number with the
tiny random Llama of ``conftest.py``, so the backend's results can be compared with the
in-process backend's. Faults are scripted: HTTP errors, delays, wrong echo log-probabilities,
no prompt log-probabilities, and it records what it received.
"""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class FakeOpenAIServer:
    """``with FakeOpenAIServer(model_dir) as server: server.base_url`` -> ``http://127.0.0.1:PORT/v1``.

    model_dir None: no model; generation answers a fixed text (for routing and retry tests).
    fail_status: answer this HTTP status to the next ``fail_count`` completion requests.
    delay: seconds each completion request waits before it is answered (``first_delay`` for the first).
    echo_offset: added to every echoed prompt log-probability (a server whose echo is wrong).
    prompt_logprobs: False -> ignore vLLM's prompt_logprobs (like a server that lacks them).
    echo: False -> ignore ``echo``.
    """

    def __init__(self, model_dir=None, name: str = "tiny", fail_status: int = 503, fail_count: int = 0,
                 delay: float = 0.0, first_delay: float | None = None, echo_offset: float = 0.0,
                 prompt_logprobs: bool = True, echo: bool = True):
        self.name = name
        self.fail_status, self.fail_count = fail_status, fail_count
        self.delay, self.first_delay = delay, first_delay
        self.echo_offset, self.prompt_logprobs, self.echo = echo_offset, prompt_logprobs, echo
        self.requests: list[dict] = []  # completion bodies received
        self.headers: list[dict] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self._lock = threading.Lock()
        self._model_lock = threading.Lock()
        self.model = self.tokenizer = None
        if model_dir is not None:
            import torch
            from transformers import AutoModelForCausalLM, AutoTokenizer

            self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
            self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.httpd.daemon_threads = True
        self.base_url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def __enter__(self):
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()

    # ------------------------------------------------------------ model maths

    def _logprobs_of(self, ids: list[int]) -> list[float | None]:
        """log P(ids[i] | ids[:i]) for each position (None at 0)."""
        import torch

        with self._model_lock, torch.inference_mode():
            logits = self.model(torch.tensor([ids])).logits[0].float()
            logp = torch.log_softmax(logits[:-1], dim=-1)
            values = logp.gather(-1, torch.tensor(ids[1:]).unsqueeze(-1)).squeeze(-1).tolist()
        return [None] + values

    def _continue(self, ids: list[int], body: dict) -> tuple[list[int], list[float], str]:
        import torch

        max_tokens = body.get("max_tokens", 16)
        temperature = body.get("temperature", 1.0)
        stop = set(body.get("stop_token_ids") or [self.tokenizer.eos_token_id])
        generator = torch.Generator().manual_seed(body.get("seed") or 0)
        out, lps = [], []
        with self._model_lock, torch.inference_mode():
            for _ in range(max_tokens):
                logits = self.model(torch.tensor([ids + out])).logits[0, -1].float()
                if len(out) < body.get("min_tokens", 0):
                    logits[list(stop)] = float("-inf")
                logp = torch.log_softmax(logits, dim=-1)
                if temperature > 0:
                    tok = int(torch.multinomial(torch.softmax(logits / temperature, -1), 1, generator=generator))
                else:
                    tok = int(logits.argmax())
                out.append(tok)
                lps.append(float(logp[tok]))
                if tok in stop:
                    return out, lps, "stop"
        return out, lps, "length"

    # ------------------------------------------------------------ answers

    def completions(self, body: dict) -> dict:
        prompt = body["prompt"]
        if isinstance(prompt, str):
            prompt = self.tokenizer(prompt, add_special_tokens=False)["input_ids"] if self.tokenizer else [0]
        if self.model is None:
            return {"choices": [{"text": " fixed answer ", "finish_reason": "stop"}],
                    "usage": {"completion_tokens": 3}}
        out, lps, reason = self._continue(prompt, body)
        choice: dict = {"text": self.tokenizer.decode(out, skip_special_tokens=True), "finish_reason": reason}
        if body.get("logprobs") is not None:
            tokens = [f"token_id:{t}" if body.get("return_tokens_as_token_ids") else self.tokenizer.decode([t])
                      for t in out]
            token_logprobs = lps
            if body.get("echo") and self.echo:
                token_logprobs = [None if v is None else v + self.echo_offset
                                  for v in self._logprobs_of(prompt)] + lps
            choice["logprobs"] = {"tokens": tokens, "token_logprobs": token_logprobs}
        if body.get("prompt_logprobs") is not None and self.prompt_logprobs:
            values = self._logprobs_of(prompt)
            choice["prompt_logprobs"] = [None] + [{str(t): {"logprob": v, "rank": 1}}
                                                  for t, v in zip(prompt[1:], values[1:], strict=True)]
        return {"choices": [choice], "usage": {"completion_tokens": len(out)}}

    def _handler(self):
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _answer(self, status: int, data: dict) -> None:
                payload = json.dumps(data).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def do_GET(self):
                if self.path == "/v1/models":
                    self._answer(200, {"data": [{"id": server.name, "max_model_len": 4096}]})
                else:
                    self._answer(404, {"detail": "Not Found"})

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with server._lock:
                    server.requests.append(body)
                    server.headers.append(dict(self.headers))
                    first = len(server.requests) == 1
                    failing = server.fail_count > 0
                    if failing:
                        server.fail_count -= 1
                    server.in_flight += 1
                    server.max_in_flight = max(server.max_in_flight, server.in_flight)
                try:
                    time.sleep(server.first_delay if first and server.first_delay is not None else server.delay)
                    if failing:
                        message = f"scripted failure {server.fail_status}"
                        self._answer(server.fail_status, {"error": {"message": message}})
                    elif body.get("model") != server.name:
                        self._answer(404, {"error": {"message": f"The model `{body.get('model')}` does not exist."}})
                    else:
                        self._answer(200, server.completions(body))
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (a timeout test)
                finally:
                    with server._lock:
                        server.in_flight -= 1

        return Handler
