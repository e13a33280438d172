"""The step's update, deferred until the step is known to be applied.

What a training step computes for changing a module's own state (InstDisc's bank rows, MoCo's
keys, the sampled PIC classifier's rows) must not change it in ``forward``: the trainer skips a
step whose loss or gradient is not finite, and a skipped step changes nothing. ``forward``
hands the update over with :meth:`DeferredUpdate.defer_update`; ``after_step``, called only for
an applied step, takes it with :meth:`DeferredUpdate.deferred_update`. A skipped step's update
is never taken: the next ``forward`` replaces it.
"""

from __future__ import annotations

from typing import Any


class DeferredUpdate:
    """Mixin for an ``nn.Module`` whose ``after_step`` applies what its ``forward`` produced."""

    _update: Any = None

    def defer_update(self, update: Any) -> None:
        """Called by ``forward``: what ``after_step`` applies if this step is taken (None:
        nothing in flight, e.g. after a restore)."""
        self._update = update

    def deferred_update(self) -> Any:
        """Called by ``after_step``: the last ``forward``'s update (None if none), taken once."""
        update, self._update = self._update, None
        return update
