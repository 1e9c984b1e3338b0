"""framework/components/stop.py: SIGUSR1 sets a flag the train loop reads after a step."""

from __future__ import annotations

import os
import signal
import threading

from framework.components.stop import StopRequest


def test_sigusr1_is_seen_after_it_arrives_and_the_old_handler_comes_back():
    def before(signum, frame):  # a handler of someone else's, restored by close()
        raise AssertionError("the stop request's handler should be in place")

    previous = signal.signal(signal.SIGUSR1, before)
    try:
        stop = StopRequest()
        assert stop.group is None and not stop.agreed()  # one process: no collective
        os.kill(os.getpid(), signal.SIGUSR1)
        assert stop.agreed() and stop.name == "SIGUSR1"
        stop.close()
        assert signal.getsignal(signal.SIGUSR1) is before
    finally:
        signal.signal(signal.SIGUSR1, previous)


def test_outside_the_main_thread_nothing_is_installed():
    found = []
    thread = threading.Thread(target=lambda: found.append(StopRequest()))
    thread.start()
    thread.join()
    (stop,) = found
    assert not stop.installed and not stop.agreed()
    stop.close()  # nothing to restore
