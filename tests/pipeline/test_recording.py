"""Signals wait for an MLflow write in progress, then act as usual."""

from __future__ import annotations

import signal

import pytest

from pipeline.recording import deferred_signals


def test_ctrl_c_during_a_write_is_delivered_after_it():
    steps = []
    with pytest.raises(KeyboardInterrupt), deferred_signals():
        signal.raise_signal(signal.SIGINT)
        steps.append("the write finished")
    assert steps == ["the write finished"], "the signal must not cut the block short"
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler, "handler restored"


def test_sigterm_reaches_the_previous_handler_afterwards():
    received = []
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: received.append(signum))
    try:
        with deferred_signals():
            signal.raise_signal(signal.SIGTERM)
            assert received == [], "held while the block runs"
        assert received == [signal.SIGTERM], received
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_no_signal_no_effect():
    before = signal.getsignal(signal.SIGTERM)
    with deferred_signals():
        pass
    assert signal.getsignal(signal.SIGTERM) is before
