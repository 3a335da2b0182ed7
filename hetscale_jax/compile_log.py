"""Counts of what compiled, per named program, for a run's summary.

A growing model compiles its train step anew at every growth event, so compiling is part of
what a run costs; an unexpected recompile (a static argument that no longer compares equal, a
changed shape) or a persistent cache that stopped serving costs seconds to minutes and changes
no other number a run reports. JAX announces every compilation through jax.monitoring; this
module counts those of the programs its caller names:

    before = compile_log.totals()
    with compile_log.program("spectrum"):
      spectrum = splitting.splitting_spectrum(...)
    eval_step = compile_log.named("eval_step", eval_step)   # each call within program(...)
    compile_log.since(before, ["spectrum", "eval_step"])
    # {"spectrum": {"compiles": 1, "cache_hits": 0, "seconds": 2.3}, "eval_step": {...}}

"compiles" counts XLA compile requests (JAX reports backend_compile_duration for each, also
when its persistent compilation cache serves it), "cache_hits" those the persistent cache
served (JAX reports cache_hits within the same request), "seconds" their durations (compiling
or reading the cache). A call served by JAX's in-memory caches counts nothing, and so does a
compilation outside a named program or on another thread. The counts are this process's: a
resumed run counts what it compiled itself, not what the run it resumes compiled before.
"""

import collections
from collections.abc import Callable, Iterable
import contextlib
import contextvars
import functools

import jax

_COMPILE = "/jax/core/compile/backend_compile_duration"
_CACHE_HIT = "/jax/compilation_cache/cache_hits"
_FIELDS = ("compiles", "cache_hits", "seconds")

# The program named on this thread, or None. A context variable: a new thread (orbax's
# checkpoint writers) starts outside any program.
_current = contextvars.ContextVar("compile_log_program", default=None)
_totals: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)


def _on_event(event: str, **unused_kwargs):
  if event == _CACHE_HIT and (name := _current.get()) is not None:
    _totals[name]["cache_hits"] += 1


def _on_duration(event: str, seconds: float, **unused_kwargs):
  if event == _COMPILE and (name := _current.get()) is not None:
    _totals[name]["compiles"] += 1
    _totals[name]["seconds"] += seconds


@functools.cache
def _listen():
  """Registers the listeners, once per process: JAX keeps every listener registered."""
  jax.monitoring.register_event_listener(_on_event)
  jax.monitoring.register_event_duration_secs_listener(_on_duration)


@contextlib.contextmanager
def program(name: str):
  """Counts what compiles within as `name`'s (the innermost name wins)."""
  _listen()
  token = _current.set(name)
  try:
    yield
  finally:
    _current.reset(token)


def named(name: str, fn: Callable) -> Callable:
  """`fn` whose every call runs within program(name)."""
  @functools.wraps(fn)
  def call(*args, **kwargs):
    with program(name):
      return fn(*args, **kwargs)
  return call


def totals() -> dict[str, dict]:
  """{program: {field: count}} of everything counted so far in this process."""
  return {name: {f: counts[f] for f in _FIELDS} for name, counts in _totals.items()}


def since(before: dict[str, dict], programs: Iterable[str]) -> dict[str, dict]:
  """Each of `programs`' counts now less those in `before` (an earlier totals()): zeros for a
  program that compiled nothing since."""
  now = totals()
  zero = dict.fromkeys(_FIELDS, 0)
  return {p: {f: now.get(p, zero)[f] - before.get(p, zero)[f] for f in _FIELDS} for p in programs}


def describe(counts: dict[str, dict]) -> str:
  """One line: each program's compiles, how many the persistent cache served, and seconds."""
  return "compiled: " + ", ".join(
      f"{p} {c['compiles']}x in {c['seconds']:.1f}s ({c['cache_hits']} from the persistent cache)"
      for p, c in counts.items())
