"""The serving loop: one thread takes queued requests, batches them, and generates.

Batching is static (a batch runs until its last row finishes), not continuous as in vLLM: a
batch forms from the queue when it is full (`max_batch_size`) or `batch_wait` after its oldest
request arrived, whichever comes first. Requests for different adapters share a batch (PEFT's
`adapter_names`), up to `max_resident` distinct adapters per batch; requests share a batch only
with the same sampling settings (greedy, or one temperature and top_p). The oldest request is
always in the next batch, so nothing starves.

Each row stops on its own: at the end-of-sequence token, at one of its stop strings, or at its
own max_tokens; a finished row no longer counts (generate pads it) and the batch ends when every
row has finished. Stopping is checked after every token, which is also where streamed text is
handed out. Adapter loads, unloads and admin changes run on the same thread between batches, so
the model never changes under a running batch.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter, deque
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass, field
from typing import Callable

import torch
from transformers import (
    LogitsProcessor,
    LogitsProcessorList,
    StoppingCriteria,
    StoppingCriteriaList,
)

from tuneoff.serving.model import MultiLoraModel

log = logging.getLogger("tuneoff.serve")


class QueueFull(Exception):
    """More requests are waiting than the server queues (HTTP 503)."""


class EngineStopped(Exception):
    """The server is shutting down."""


@dataclass(frozen=True)
class Sampling:
    """How the next token is picked: temperature 0 is greedy (as evaluation decodes)."""

    temperature: float
    top_p: float

    def generate_kwargs(self) -> dict:
        if self.temperature == 0:
            return {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
        return {"do_sample": True, "temperature": self.temperature, "top_p": self.top_p, "top_k": None}


@dataclass(eq=False)
class Request:
    adapter: str | None  # None: the base alone
    prompt_ids: list[int]
    max_tokens: int
    stop: tuple[str, ...]
    sampling: Sampling
    min_tokens: int = 0  # end-of-sequence is not allowed before this many tokens (vLLM's min_tokens)
    on_text: Callable[[str], None] | None = None  # streaming: called on the engine thread with each new text
    future: Future = field(default_factory=Future)
    arrived: float = field(default_factory=time.perf_counter)
    abandoned: bool = False  # the client went away: stop generating for it


@dataclass(frozen=True)
class Completion:
    text: str
    finish_reason: str  # "stop" (end of sequence or a stop string) | "length" (max_tokens)
    prompt_tokens: int
    completion_tokens: int
    queue_seconds: float  # arrival to the start of its batch (includes loading its adapter)
    first_token_seconds: float | None  # arrival to the first generated token
    total_seconds: float


class _Row:
    """One request's progress inside a running batch."""

    def __init__(self, request: Request, tokenizer, eos_ids: set[int]):
        self.request, self.tokenizer, self.eos_ids = request, tokenizer, eos_ids
        self.tokens: list[int] = []
        self.text, self.sent = "", ""
        self.finish: str | None = None
        self.first_token_at: float | None = None
        # text that could still turn out to be the start of a stop string is held back from a stream
        self.hold = max((len(s) for s in request.stop), default=1) - 1

    def step(self, token: int, now: float) -> None:
        if self.first_token_at is None:
            self.first_token_at = now
        if self.request.abandoned:
            self.finish = "abandoned"
            return
        if token in self.eos_ids:
            self.finish = "stop"
        else:
            self.tokens.append(token)
            text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
            cuts = [i for i in (text.find(s) for s in self.request.stop) if i >= 0]
            if cuts:
                text, self.finish = text[: min(cuts)], "stop"
            elif len(self.tokens) >= self.request.max_tokens:
                self.finish = "length"
            self.text = text
        self.stream()

    def stream(self) -> None:
        """Hand the client the text that is final: all of it once finished; before that, none that
        could still be a stop string's start or half a UTF-8 character."""
        if self.request.on_text is None:
            return
        ready = self.text if self.finish else self.text[: len(self.text) - self.hold].rstrip("\ufffd")
        if len(ready) > len(self.sent) and ready.startswith(self.sent):
            self.request.on_text(ready[len(self.sent):])
            self.sent = ready


class _RowStopper(StoppingCriteria):
    """Called by generate after every token: advances each row, says which rows are done."""

    def __init__(self, rows: list[_Row]):
        self.rows = rows

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.BoolTensor:
        now = time.perf_counter()
        for row, token in zip(self.rows, input_ids[:, -1].tolist()):
            if row.finish is None:
                row.step(token, now)
        return torch.tensor([row.finish is not None for row in self.rows], device=input_ids.device)


class _MinTokens(LogitsProcessor):
    """Rules out end-of-sequence for each row that has not yet reached its min_tokens."""

    def __init__(self, rows: list[_Row], eos_ids: set[int]):
        self.rows, self.eos_ids = rows, sorted(eos_ids)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        short = [i for i, row in enumerate(self.rows) if len(row.tokens) < row.request.min_tokens]
        if short:
            scores[torch.tensor(short)[:, None], torch.tensor(self.eos_ids)[None, :]] = -float("inf")
        return scores


class Engine:
    """Queues requests and admin changes; one thread batches and runs them on `model`."""

    def __init__(self, model: MultiLoraModel, max_batch_size: int, batch_wait_s: float, max_queue: int):
        self.model, self.max_batch_size, self.batch_wait_s, self.max_queue = model, max_batch_size, batch_wait_s, max_queue
        tok = model.tokenizer
        self.eos_ids = {tok.eos_token_id}  # the same end as evaluation's generate (tuneoff/evaluation/generate.py)
        self.pending: deque[Request] = deque()
        self.control: deque[tuple[Callable, tuple, Future]] = deque()
        self.cond = threading.Condition()
        self.stopping = False
        self.thread = threading.Thread(target=self._loop, name="tuneoff-engine", daemon=True)
        self.counters: Counter = Counter()
        self.batch_sizes: Counter = Counter()
        self.started_at = time.time()
        self.free_since = 0.0  # perf_counter() when the last batch ended

    # -- called from HTTP handlers --------------------------------------------------------------

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        with self.cond:
            self.stopping = True
            self.cond.notify_all()
        self.thread.join(timeout=60)
        for request in list(self.pending):
            _fail(request.future, EngineStopped("the server is shutting down"))
        for _, _, future in list(self.control):
            _fail(future, EngineStopped("the server is shutting down"))

    @property
    def alive(self) -> bool:
        return self.thread.is_alive() and not self.stopping

    def submit(self, request: Request) -> Future:
        with self.cond:
            if self.stopping:
                raise EngineStopped("the server is shutting down")
            if len(self.pending) >= self.max_queue:
                raise QueueFull(f"{len(self.pending)} requests are queued (the server's --max-queue); retry later")
            self.pending.append(request)
            self.cond.notify_all()
        return request.future

    def withdraw(self, requests: list[Request]) -> None:
        """Take back `requests` whose answers would go to no one: the queued ones leave the queue
        (cancelled), the running ones stop at their next token."""
        with self.cond:
            for request in requests:
                request.abandoned = True
                if request in self.pending:
                    self.pending.remove(request)
                    request.future.cancel()

    def call(self, fn: Callable, *args) -> Future:
        """Run `fn(*args)` on the engine thread between batches (loading and unloading adapters)."""
        future: Future = Future()
        with self.cond:
            if self.stopping:
                raise EngineStopped("the server is shutting down")
            self.control.append((fn, args, future))
            self.cond.notify_all()
        return future

    def stats(self) -> dict:
        with self.cond:
            queued, c, sizes = len(self.pending), Counter(self.counters), dict(sorted(self.batch_sizes.items()))
        return {"uptime_seconds": round(time.time() - self.started_at, 1), "queued": queued,
                "requests": {"completed": c["completed"], "failed": c["failed"]},
                "tokens": {"prompt": c["prompt_tokens"], "completion": c["completion_tokens"]},
                "batches": {"count": c["batches"], "mixed_adapters": c["mixed_batches"],
                            "max_models_in_one": c["max_models"], "generate_seconds": round(c["generate_seconds"], 3),
                            "sizes": sizes},
                "max_batch_size": self.max_batch_size, "batch_wait_ms": self.batch_wait_s * 1000,
                **self.model.stats()}

    # -- the engine thread ----------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            op, batch = None, None
            with self.cond:
                while not (self.pending or self.control or self.stopping):
                    self.cond.wait()
                if self.stopping:
                    return
                if self.control:
                    op = self.control.popleft()
                else:
                    # wait from the later of the oldest arrival and the end of the last batch: clients
                    # answered by that batch get the chance to join the next one (else closed-loop
                    # clients settle into half-full batches that alternate)
                    deadline = max(self.pending[0].arrived, self.free_since) + self.batch_wait_s
                    while (len(self.pending) < self.max_batch_size and not self.control and not self.stopping
                           and (left := deadline - time.perf_counter()) > 0):
                        self.cond.wait(left)
                    if self.stopping or self.control:
                        continue
                    batch = self._take_batch()
            try:
                if op is not None:
                    fn, args, future = op
                    if future.set_running_or_notify_cancel():
                        try:
                            future.set_result(fn(*args))
                        except Exception as e:  # noqa: BLE001 - reported to the caller, the engine goes on
                            future.set_exception(e)
                elif batch:
                    self._run(batch)
                    self.free_since = time.perf_counter()
            except Exception:  # noqa: BLE001 - nothing a request does may kill the engine
                log.exception("engine: unexpected error (the server goes on)")

    def _take_batch(self) -> list[Request]:
        """The oldest request and the queued ones that can share its batch; drops cancelled ones."""
        first = self.pending[0]
        chosen, adapters = [], set()
        for request in self.pending:
            if len(chosen) == self.max_batch_size:
                break
            if request.sampling != first.sampling:
                continue
            if request.adapter is not None and request.adapter not in adapters:
                if len(adapters) == self.model.max_resident:
                    continue
                adapters.add(request.adapter)
            chosen.append(request)
        for request in chosen:
            self.pending.remove(request)
        return [r for r in chosen if r.future.set_running_or_notify_cancel()]

    def _run(self, batch: list[Request]) -> None:
        started = time.perf_counter()
        failed = self.model.make_resident([r.adapter for r in batch if r.adapter is not None])
        for request in [r for r in batch if r.adapter in failed]:
            self._fail(request, failed[request.adapter])
        batch = [r for r in batch if r.adapter not in failed]
        if not batch:
            return
        tok = self.model.tokenizer
        width = max(len(r.prompt_ids) for r in batch)
        input_ids = torch.full((len(batch), width), tok.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
        for i, r in enumerate(batch):  # left padding: every prompt ends at the same column
            input_ids[i, width - len(r.prompt_ids):] = torch.tensor(r.prompt_ids)
            attention_mask[i, width - len(r.prompt_ids):] = 1
        rows = [_Row(r, self.model.decoder, self.eos_ids) for r in batch]
        min_tokens = [_MinTokens(rows, self.eos_ids)] if any(r.min_tokens for r in batch) else []
        generating = time.perf_counter()
        try:
            self.model.generate(input_ids.to(self.model.dev), attention_mask.to(self.model.dev),
                                [r.adapter for r in batch], max_new_tokens=max(r.max_tokens for r in batch),
                                stopping_criteria=StoppingCriteriaList([_RowStopper(rows)]),
                                logits_processor=LogitsProcessorList(min_tokens),
                                pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                                **batch[0].sampling.generate_kwargs())
        except Exception as e:  # noqa: BLE001 - this batch fails, the server goes on
            log.exception("engine: batch of %d failed", len(batch))
            for r in batch:
                self._fail(r, e)
            return
        done = time.perf_counter()
        models = {r.adapter for r in batch}
        with self.cond:  # counted before anyone is answered: a client that reads /stats next sees its request
            c = self.counters
            c["batches"] += 1
            c["mixed_batches"] += len(models) > 1
            c["max_models"] = max(c["max_models"], len(models))
            c["generate_seconds"] += done - generating
            c["completed"] += len(rows)
            c["prompt_tokens"] += sum(len(r.prompt_ids) for r in batch)
            c["completion_tokens"] += sum(len(row.tokens) for row in rows)
            self.batch_sizes[len(batch)] += 1
        for row in rows:
            if row.finish is None:  # cannot happen (max_new_tokens is the batch's largest max_tokens); be safe
                row.finish = "length"
                row.stream()
            r = row.request
            _resolve(r.future, Completion(
                text=row.text, finish_reason="stop" if row.finish == "abandoned" else row.finish,
                prompt_tokens=len(r.prompt_ids), completion_tokens=len(row.tokens),
                queue_seconds=started - r.arrived,
                first_token_seconds=None if row.first_token_at is None else row.first_token_at - r.arrived,
                total_seconds=done - r.arrived))

    def _fail(self, request: Request, error: Exception) -> None:
        with self.cond:
            self.counters["failed"] += 1
        _fail(request.future, error)


def _resolve(future: Future, result) -> None:
    try:
        future.set_result(result)
    except InvalidStateError:  # cancelled meanwhile: nobody waits for it
        pass


def _fail(future: Future, error: Exception) -> None:
    try:
        future.set_exception(error)
    except InvalidStateError:
        pass
