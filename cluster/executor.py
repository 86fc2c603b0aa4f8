"""What the engine loop needs of an executor: the one interface every way of running the model offers.

The engine (router/engine.py) is handed an `Executor` and knows nothing else of it: the whole model
in a thread (LocalExecutor), in a child process (ProcessExecutor), or pipeline stages and expert shards
as Ray actors (RayExecutor). Tests hand it their own. No torch here, so the router can name the type.
"""
from __future__ import annotations

from typing import Awaitable, Protocol, runtime_checkable

from .contracts import StepPlan, StepResult


@runtime_checkable
class Executor(Protocol):
    # Optional: `runs_in_order = True` where passes run one after another on one model in the order they
    # were submitted (the in-process and child-process executors); the scheduler's look-ahead needs it.

    def submit(self, plan: StepPlan) -> Awaitable[StepResult]:
        """Start the pass now (the model computes while the engine streams the last pass's tokens) and
        return an awaitable of its result. Called on the engine's event loop."""

    def is_fatal(self, err: BaseException) -> bool:
        """Whether a failed pass lost state every sequence depends on (an actor or the child process
        died): the engine then fails everything in flight and calls rebuild(). Otherwise only the
        plan's requests fail."""

    def rebuild(self) -> None:
        """Replace what died, with empty caches. Called off the event loop."""

    def shutdown(self) -> None:
        """Release threads, processes and actors; idempotent."""
