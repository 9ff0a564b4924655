"""The resume state is written off the training thread, and a half-written file is never read."""

from __future__ import annotations

import resource
import threading

import pytest
import torch

from search.trial.objective import ResumeWriter, _load_resume, remove_resume


def test_the_state_as_it_was_at_save_is_written(tmp_path):
    path = tmp_path / "resume" / "trial-0.pt"
    weights = torch.zeros(4)
    state = {"model": {"w": weights}, "history": [0.5], "best_epoch": 0}
    writer = ResumeWriter(path)
    writer.save(state)
    weights += 1  # training goes on at once
    state["history"].append(0.6)
    writer.close()
    loaded = _load_resume(path)
    assert torch.equal(loaded["model"]["w"], torch.zeros(4)) and loaded["history"] == [0.5]
    assert not writer._thread.is_alive()


def test_a_reader_sees_the_old_state_or_the_new_one_never_half_of_one(tmp_path):
    path = tmp_path / "trial-1.pt"
    big = 4_000_000  # 16 MB: each write takes a while
    writer = ResumeWriter(path)
    seen: set[int] = set()
    broken: list[Exception] = []
    stop = threading.Event()

    def read_all_the_time():
        while not stop.is_set():
            if not path.exists():
                assert not seen  # once written, the file never goes away
                continue
            try:  # torch.load itself: _load_resume would hide a half-written file
                state = torch.load(path, weights_only=True)
            except Exception as error:
                broken.append(error)
                continue
            assert state["model"].shape == (big,)
            seen.add(int(state["model"][-1]))

    reader = threading.Thread(target=read_all_the_time)
    reader.start()
    try:
        for epoch in range(1, 6):
            writer.save({"model": torch.full((big,), float(epoch))})
        writer.close()
    finally:
        stop.set()
        reader.join()
    assert not broken
    assert seen and seen <= {1, 2, 3, 4, 5}
    assert int(_load_resume(path)["model"][-1]) == 5  # the last state won
    assert list(tmp_path.iterdir()) == [path]  # no temporary file left


def test_leftovers_of_a_killed_writer_are_never_read(tmp_path):
    path = tmp_path / "trial-2.pt"
    torch.save({"model": torch.ones(1000)}, path.with_suffix(".4242.tmp"))  # killed mid-way
    assert _load_resume(path) is None
    whole = tmp_path / "whole.pt"
    torch.save({"model": torch.ones(1000)}, whole)
    path.write_bytes(whole.read_bytes()[:2000])  # a truncated file where the state should be
    assert _load_resume(path) is None  # the trial starts afresh instead of crashing


def test_a_write_error_reaches_the_training_thread(tmp_path):
    (tmp_path / "file").write_text("not a folder")
    writer = ResumeWriter(tmp_path / "file" / "trial-3.pt")
    writer.save({"model": torch.zeros(1)})
    with pytest.raises(RuntimeError, match=r"could not write .*trial-3\.pt"):
        writer.close()


def test_a_full_disk_is_named_and_leaves_no_partial_file(tmp_path):
    path = tmp_path / "trial-4.pt"
    writer = ResumeWriter(path)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    # No file of this process may pass 64 kB for a moment: the write fails half-way, as
    # on a full disk (Python ignores SIGXFSZ, so the write itself fails with EFBIG).
    resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, hard))
    try:
        writer.save({"model": torch.zeros(100_000)})  # 400 kB
        with pytest.raises(RuntimeError) as raised:
            writer.close()
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert str(raised.value).startswith(f"could not write {path}: ")
    assert list(tmp_path.iterdir()) == []  # nobody would ever delete half a state


def test_removing_a_resume_file_removes_what_killed_writers_left(tmp_path):
    path = tmp_path / "trial-5.pt"
    for name in ("trial-5.pt", "trial-5.4242.tmp", "trial-5.77.tmp", "trial-50.4242.tmp"):
        (tmp_path / name).write_bytes(b"state")
    remove_resume(path)
    assert [p.name for p in tmp_path.iterdir()] == ["trial-50.4242.tmp"]  # another trial's
