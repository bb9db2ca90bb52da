"""The stop check's pace: in a process group it is a collective, run about every
CHECK_SECONDS of training rather than after every update, and a signal still stops the
run within that time."""
import pytest
import torch.distributed as dist

from engine import preemption


@pytest.fixture
def group_of_one(tmp_path):
    dist.init_process_group('gloo', store=dist.FileStore(str(tmp_path / 'store'), 1), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def _train(stop, clock, monkeypatch, updates, seconds_per_update, signal_at=None):
    """Call the check after each of `updates` updates; the update counts where a collective
    ran, and the update at which the stop was agreed (None: not stopped)."""
    collectives = []
    all_reduce = dist.all_reduce
    monkeypatch.setattr(preemption.dist, 'all_reduce', lambda *a, **k: (collectives.append(done), all_reduce(*a, **k)))
    for done in range(1, updates + 1):
        clock.now += seconds_per_update
        if done == signal_at:
            stop.signal_name = 'SIGTERM'
        if stop.agreed_after_update(done):
            return collectives, done
    return collectives, None


@pytest.mark.parametrize('seconds_per_update, most', [(0.01, 4), (0.3, 70), (2.0, 200)])
def test_collectives_about_once_a_second(group_of_one, monkeypatch, seconds_per_update, most):
    clock = Clock()
    monkeypatch.setattr(preemption.time, 'monotonic', clock)
    collectives, stopped = _train(preemption.StopRequest(), clock, monkeypatch, 200, seconds_per_update)
    assert stopped is None
    assert collectives[:2] == [1, 2]  # the pace is measured first
    assert len(collectives) <= most
    gaps = [b - a for a, b in zip(collectives[1:], collectives[2:])]
    assert all(gap == 1 or gap * seconds_per_update <= preemption.CHECK_SECONDS + 1e-9 for gap in gaps)
    assert max(gaps) >= min(100, preemption.CHECK_SECONDS / seconds_per_update - 1)  # and not more often


@pytest.mark.parametrize('seconds_per_update', [0.01, 0.3, 2.0])
def test_a_signal_stops_within_the_check_time(group_of_one, monkeypatch, seconds_per_update):
    clock = Clock()
    monkeypatch.setattr(preemption.time, 'monotonic', clock)
    _, stopped = _train(preemption.StopRequest(), clock, monkeypatch, 500, seconds_per_update, signal_at=150)
    assert stopped is not None and stopped >= 150
    assert (stopped - 150) * seconds_per_update <= preemption.CHECK_SECONDS + seconds_per_update


def test_without_a_process_group_the_flag_is_read_every_update():
    stop = preemption.StopRequest()
    assert not stop.agreed_after_update(1)
    stop.signal_name = 'SIGTERM'
    assert stop.agreed_after_update(2) and stop.agreed()
