"""The background prefetcher: every batch in order, no thread left however the loop ends."""

from __future__ import annotations

import os
import signal
import threading
import time

import numpy as np
import optuna
import pytest
import torch

from search.data.prepared import Split
from search.trial.prefetch import DeviceBatches, Prefetcher

CPU = torch.device("cpu")


@pytest.fixture
def baseline():
    """The number of threads before the test; asserts it is back to that after."""
    before = threading.active_count()
    yield before
    assert threading.active_count() == before


def slow(seconds: float):
    def produce(item):
        time.sleep(seconds)
        return item
    return produce


def test_every_item_in_order_then_the_thread_ends(baseline):
    with Prefetcher(range(20), lambda i: i * i, depth=2) as results:
        assert list(results) == [i * i for i in range(20)]
        assert list(results) == []  # exhausted stays exhausted
    assert not results.alive


def test_it_works_ahead_while_the_consumer_is_busy(baseline):
    with Prefetcher(range(6), slow(0.1), depth=3) as results:
        time.sleep(0.45)  # "training": the producer fills the queue meanwhile
        start = time.perf_counter()
        assert [next(results) for _ in range(3)] == [0, 1, 2]
        assert time.perf_counter() - start < 0.08


def test_early_stopping_break_stops_a_producer_blocked_on_a_full_queue(baseline):
    produced = []
    with Prefetcher(range(10_000), lambda i: produced.append(i) or i, depth=2) as results:
        for i in results:
            if i == 3:
                break  # the producer is blocked on put() now
    assert not results.alive
    assert len(produced) < 10  # it did not run on to the end


def test_pruning_raised_in_the_loop_stops_the_thread(baseline):
    with pytest.raises(optuna.TrialPruned), Prefetcher(range(100), slow(0.01)) as results:
        for i in results:
            if i == 2:
                raise optuna.TrialPruned()
    assert not results.alive


def test_ctrl_c_while_waiting_on_a_slow_producer(baseline):
    timer = threading.Timer(0.2, os.kill, (os.getpid(), signal.SIGINT))
    started = time.perf_counter()
    with pytest.raises(KeyboardInterrupt), Prefetcher(range(100), slow(0.5)) as results:
        timer.start()
        list(results)  # waits for the first item when the signal comes
    timer.join()
    # Leaving the block waited for the item in progress only, not for the other 99.
    assert time.perf_counter() - started < 3
    assert not results.alive


def test_an_error_in_the_producer_is_raised_in_the_consumer(baseline):
    def produce(i):
        if i == 3:
            raise ValueError("bad row 3")
        return i

    seen = []
    with pytest.raises(ValueError, match="bad row 3"), Prefetcher(range(10), produce) as results:
        seen.extend(results)
    assert seen == [0, 1, 2]
    assert not results.alive


def test_device_batches_equal_the_synchronous_batches(baseline):
    rng = np.random.default_rng(0)
    split = Split(labels=np.arange(10) % 3,
                  images={"rgb": rng.integers(0, 255, (10, 4, 4, 3), dtype=np.uint8),
                          "depth": rng.integers(0, 255, (10, 4, 4, 1), dtype=np.uint8)},
                  numeric=rng.normal(size=(10, 2)).astype(np.float32))
    row_batches = [np.array([3, 1, 4]), np.array([0, 9]), np.array([2, 5, 6, 7, 8])]
    with DeviceBatches(split, row_batches, device=CPU, channels_last=True) as batches:
        got = list(batches)
    assert len(got) == 3
    for rows, (inputs, labels) in zip(row_batches, got, strict=True):
        expected = split.batch(rows, CPU, channels_last=True)
        assert sorted(inputs) == sorted(expected) == ["depth", "numeric", "rgb"]
        assert all(torch.equal(inputs[key], expected[key]) for key in expected)
        assert inputs["rgb"].is_contiguous(memory_format=torch.channels_last)
        assert labels.tolist() == (rows % 3).tolist()
    assert not batches.alive
