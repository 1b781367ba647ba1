"""placer.interrupts: SIGTERM stops a run like Ctrl-C, and a few files can be swapped
in with both held back."""

import signal

import pytest

from placer import interrupts
from placer.interrupts import Terminated, deferred, interruption, terminate_like_interrupt


def test_sigterm_raises_terminated_a_keyboard_interrupt(monkeypatch):
    monkeypatch.setitem(interrupts._received, "SIGTERM", False)  # the process-wide record, restored after
    assert not isinstance(interruption(), Terminated)
    before = signal.getsignal(signal.SIGTERM)
    terminate_like_interrupt()
    try:
        with pytest.raises(KeyboardInterrupt) as caught:
            signal.raise_signal(signal.SIGTERM)
        assert isinstance(caught.value, Terminated) and isinstance(interruption(), Terminated)
    finally:
        signal.signal(signal.SIGTERM, before)


def test_deferred_holds_ctrl_c_until_the_block_ends():
    done = []
    with pytest.raises(KeyboardInterrupt):
        with deferred():
            signal.raise_signal(signal.SIGINT)
            done.append("the whole block ran")
    assert done == ["the whole block ran"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
