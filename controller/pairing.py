"""Two paired phones' sessions in lockstep: where they meet, and what a side that
cannot meet its peer is told.

A plan's pair (``pairs: [[phone1, phone2]]``) runs the same app and activity on both
phones at the same time. Each session meets its peer's before it starts (``start``), once
both have their tracers running, right before the scenario (``scenario``), and once both
scenarios got their app to its first screen, before the first action (``ready``: the
caller does not dial while the callee is still relaunching its app, which would drop the
ringing call); after the scenario they wait for each other once more (``done``), so
neither stops its capture while the other is still in the call. A side whose session
fails or ends tells the other (:meth:`PairLink.leave`), which then fails at once with
that reason instead of waiting; a peer that never comes fails the waiting side after the
plan's ``pair_timeout``; cancelling the run ends every wait::

    sync = PairSync(("phone1", "phone2"), timeout=300)
    link = sync.link("phone1", "signal_audio_call_r1")   # one per session
    link.meet("start", cancel)         # PeerFailed / ScenarioCancelled
    ...
    link.leave("finished")
"""

from __future__ import annotations

import threading
import time

from controller.errors import ControllerError

STAGES = ("start", "scenario", "ready", "done")


class PeerFailed(ControllerError):
    """A paired session could not meet its peer's (it failed, ended, or never came)."""


class PairSync:
    """The meeting points of one pair's sessions (thread-safe; one per pair and run)."""

    def __init__(self, sides: tuple[str, str], timeout: float = 300.0,
                 poll_s: float = 0.2) -> None:
        if sides[0] == sides[1]:
            raise ValueError(f"a pair needs two phones, not {sides[0]} twice")
        self.sides = sides
        self.timeout = timeout
        self.poll_s = poll_s
        self._cv = threading.Condition()
        self._arrived: dict[tuple[str, str], set[str]] = {}
        self._gone: dict[tuple[str, str], str] = {}  # (session key, side) -> why

    def peer_of(self, side: str) -> str:
        if side not in self.sides:
            raise ValueError(f"{side} is not in the pair {self.sides}")
        return self.sides[1] if side == self.sides[0] else self.sides[0]

    def link(self, side: str, key: str) -> PairLink:
        """``side``'s end of the pair for the session ``key`` (the same on both phones:
        app, activity and repetition)."""
        return PairLink(self, side, self.peer_of(side), key)

    def _arrive(self, key: str, stage: str, side: str) -> None:
        with self._cv:
            self._arrived.setdefault((key, stage), set()).add(side)
            self._cv.notify_all()

    def _leave(self, key: str, side: str, why: str) -> None:
        with self._cv:
            self._gone.setdefault((key, side), why)
            self._cv.notify_all()


class PairLink:
    """One session's end of a pair."""

    def __init__(self, sync: PairSync, side: str, peer: str, key: str) -> None:
        self.sync, self.side, self.peer, self.key = sync, side, peer, key
        self.met: dict[str, float] = {}
        """Stage -> when both sides were there (seconds since the epoch)."""
        self.left = False

    def meet(self, stage: str, cancel: threading.Event | None = None,
             timeout: float | None = None) -> float:
        """Wait until the peer's session reaches ``stage`` too; returns the seconds waited.

        Raises :class:`PeerFailed` naming the peer when its session failed or ended before
        getting there, or did not come within the timeout; ``ScenarioCancelled`` when
        ``cancel`` is set.
        """
        from controller.scenario import ScenarioCancelled

        if stage not in STAGES:
            raise ValueError(f"unknown stage {stage!r} (one of {', '.join(STAGES)})")
        s = self.sync
        limit = s.timeout if timeout is None else timeout
        t0 = time.monotonic()
        s._arrive(self.key, stage, self.side)
        with s._cv:
            while True:
                if self.peer in s._arrived.get((self.key, stage), ()):
                    self.met[stage] = time.time()
                    return time.monotonic() - t0
                why = s._gone.get((self.key, self.peer))
                if why is not None:
                    raise PeerFailed(f"peer {self.peer}: its {self.key} session {why} before "
                                     f"the {stage} barrier",
                                     hint=f"see {self.peer}'s run directory of {self.key}")
                if cancel is not None and cancel.is_set():
                    raise ScenarioCancelled("cancelled")
                left = limit - (time.monotonic() - t0)
                if left <= 0:
                    raise PeerFailed(f"peer {self.peer} did not reach the {stage} barrier of "
                                     f"{self.key} within {limit:g} s",
                                     hint="is its phone slow or stuck? raise the plan's "
                                          "pair_timeout")
                s._cv.wait(min(s.poll_s, left))

    def leave(self, why: str) -> None:
        """This side's session ended (``why``: "failed: ...", "finished"): a peer waiting
        at a stage this side will not reach stops waiting."""
        self.left = True
        self.sync._leave(self.key, self.side, why)
