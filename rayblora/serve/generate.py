"""POST /v1/generate, free of Ray: request -> decoding settings, token checks, decoding off the event loop,
abstain flags, server-sent events.

A generate request is not batched with other requests (unlike predict's ``@serve.batch``): its prompts are
decoded together by ``Posterior.generate`` on the replica's one forward thread, the thread that runs predict's
batches, so a decode and a forward never touch the shared model (whose adapter tensors decoding swaps) at once.
The event loop only awaits. A stream runs the posterior's token generator (``Posterior.generate_stream``) on
that thread to its end, or until the client goes away, and hands each event to the loop through an
``asyncio.Queue``: a slow client never holds the forward thread. Requests in flight count against the
deployment's `max_ongoing_requests` / `max_queued_requests` like predict's (503 from the proxy beyond them).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
from concurrent.futures import Executor
from typing import Any, AsyncIterator, Callable, Iterator, Sequence

from rayblora.generation.decode import DecodingSettings, Generation, GenerationSettingsError
from rayblora.serve.engine import InputError, LoadedPosterior
from rayblora.serve.schemas import DENSITY_SCORES

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
"""Headers of a stream: no caching, no buffering by a reverse proxy."""
_END = object()


class _Failure:
    """An exception raised on the forward thread, carried to the event loop."""

    def __init__(self, error: BaseException):
        self.error = error


def decoding_settings(body: Any) -> DecodingSettings:
    """The :class:`DecodingSettings` of a validated generate body; InputError naming the field otherwise."""
    try:
        return DecodingSettings(max_new_tokens=body.max_new_tokens, mode=body.mode, do_sample=body.do_sample,
                                temperature=body.temperature, seed=body.seed, stop=tuple(body.stop))
    except GenerationSettingsError as exc:
        raise InputError([(str(exc).split(":", 1)[0], str(exc))]) from exc


def check_prompt_lengths(loaded: LoadedPosterior, prompts: Sequence[str], max_tokens: int) -> None:
    """InputError naming `prompts[i]` for every prompt over `max_tokens` tokens with the posterior's tokenizer."""
    over = [(f"prompts[{i}]", f"{n} tokens; the limit is {max_tokens} (serve.max_tokens_per_input)")
            for i, n in enumerate(loaded.prompt_token_counts(prompts)) if n > max_tokens]
    if over:
        raise InputError(over)


def abstained(scores: dict[str, float], body: Any) -> bool:
    """Whether the answer's `abstain_score` is above the request's `abstain_threshold` (never without one)."""
    return body.abstain_threshold is not None and scores[body.abstain_score] > body.abstain_threshold


def _decode(posterior, prompts: Sequence[str], settings: DecodingSettings) -> list[Generation]:
    """Runs on the forward thread."""
    return posterior.generate(list(prompts), settings)


class ThreadedEvents:
    """The events of a blocking generator, produced on `executor` and awaited on the running event loop.

    `make()` is called on the executor's thread, and the generator it returns is closed there (its context
    managers, e.g. the adapter restore, exit on the thread that entered them). :meth:`cancel` stops it after
    its current event.
    """

    def __init__(self, make: Callable[[], Iterator[dict[str, Any]]], executor: Executor):
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue = asyncio.Queue()
        self._stop = threading.Event()
        self.done = self._loop.run_in_executor(executor, self._produce, make)

    def _put(self, item: Any) -> None:
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, item)
        except RuntimeError:  # the loop has closed: nobody is listening
            self._stop.set()

    def _produce(self, make: Callable[[], Iterator[dict[str, Any]]]) -> None:
        events = None
        try:
            events = make()
            for event in events:
                self._put(event)
                if self._stop.is_set():
                    break
        except Exception as exc:
            self._put(_Failure(exc))
        finally:
            if events is not None and hasattr(events, "close"):
                events.close()
            self._put(_END)

    async def get(self) -> Any:
        """The next event, a :class:`_Failure`, or the end marker."""
        return await self._queue.get()

    def cancel(self) -> None:
        self._stop.set()


async def _events(first: Any, source: ThreadedEvents, body: Any) -> AsyncIterator[dict[str, Any]]:
    """The stream from its first event on: the "done" event gains `abstained`; a failure after the first
    event ends the stream with an "error" event. Leaving early (client gone) stops the producer."""
    try:
        item = first
        while item is not _END:
            if isinstance(item, _Failure):
                yield {"event": "error", "message": f"generation failed: {item.error}"}
                return
            if item.get("event") == "done":
                item = {**item, "abstained": abstained(item["scores"], body)}
            yield item
            item = await source.get()
    finally:
        source.cancel()


async def server_sent_events(events: AsyncIterator[dict[str, Any]]) -> AsyncIterator[bytes]:
    """`data: <json>` lines, one per event, for a `text/event-stream` response; closes `events` when done."""
    async with contextlib.aclosing(events):
        async for event in events:
            yield f"data: {json.dumps(event, allow_nan=False)}\n\n".encode()


class Generating:
    """The generate half of a replica.

    Args:
        executor: the replica's forward thread (one worker), shared with predict's batches.
        max_tokens: most tokens of one prompt (`serve.max_tokens_per_input`).
    """

    def __init__(self, executor: Executor, max_tokens: int):
        self._executor, self._max_tokens = executor, max_tokens

    def _settings(self, loaded: LoadedPosterior, body: Any) -> DecodingSettings:
        if not loaded.posterior.generative:
            raise InputError([("posterior", f"posterior {loaded.entry.name!r} ({loaded.entry.method}) has no "
                                            "generative form: its samples are not adapter states a decoder runs")])
        check_prompt_lengths(loaded, body.prompts, self._max_tokens)
        if body.abstain_threshold is not None and body.abstain_score in DENSITY_SCORES \
                and loaded.posterior.density is None:
            raise InputError([("abstain_score", f"{body.abstain_score!r} needs a posterior with a feature density; "
                                                "this one has none (add one with `rayblora fit --density`)")])
        return decoding_settings(body)

    async def answer(self, loaded: LoadedPosterior, body: Any) -> dict[str, Any]:
        """The non-streamed POST /v1/generate answer for a validated body."""
        settings = self._settings(loaded, body)
        generations = await asyncio.get_running_loop().run_in_executor(
            self._executor, _decode, loaded.posterior, body.prompts, settings)
        return {"posterior": loaded.entry.name, "method": loaded.entry.method,
                "generations": [{**g.to_dict(), "abstained": abstained(g.scores, body)} for g in generations]}

    async def stream(self, loaded: LoadedPosterior, body: Any) -> AsyncIterator[dict[str, Any]]:
        """The events of a streamed answer (token events, then "done" with the scores and `abstained`). The
        first event is awaited here, so a request the posterior refuses is still an HTTP error."""
        settings = self._settings(loaded, body)
        source = ThreadedEvents(lambda: loaded.posterior.generate_stream(body.prompts[0], settings),
                                self._executor)
        try:
            first = await source.get()
        except BaseException:
            source.cancel()
            raise
        if isinstance(first, _Failure):
            raise first.error
        return _events(first, source, body)
