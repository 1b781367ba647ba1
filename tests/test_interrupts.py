"""placer.interrupts: SIGTERM stops a run like Ctrl-C, and a few files can be swapped
in with both held back."""

import signal

import pytest

from placer import interrupts
from placer.interrupts import Terminated, deferred, handle_stop_signals, interruption


def test_sigterm_raises_terminated_a_keyboard_interrupt(monkeypatch):
    monkeypatch.setitem(interrupts._received, "SIGTERM", False)  # the process-wide record, restored after
    monkeypatch.setitem(interrupts._received, "count", 0)
    assert not isinstance(interruption(), Terminated)
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    handle_stop_signals()
    try:
        with pytest.raises(KeyboardInterrupt) as caught:
            signal.raise_signal(signal.SIGTERM)
        assert isinstance(caught.value, Terminated) and isinstance(interruption(), Terminated)
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)


def test_deferred_holds_ctrl_c_until_the_block_ends():
    before = signal.signal(signal.SIGINT, signal.default_int_handler)  # Python's own, whatever ran before
    done = []
    try:
        with pytest.raises(KeyboardInterrupt):
            with deferred():
                signal.raise_signal(signal.SIGINT)
                done.append("the whole block ran")
        assert done == ["the whole block ran"]
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # restored
    finally:
        signal.signal(signal.SIGINT, before)
