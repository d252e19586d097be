"""Episode sampling (metarun/data/episodes.py): the sampler's state is device independent, and the
fixed evaluation tasks depend only on the seed, the split and the task shape."""

import pytest
import torch

from metarun.data.episodes import EpisodeSampler, fixed_tasks
from metarun.errors import MetarunError


def test_sampler_state_is_device_independent(labelled_classes):
    a = EpisodeSampler(labelled_classes, "train", 3, 1, 2, "cpu", seed=5, rotate=True)
    a.sample(4)
    state = a.state()
    assert state == {"seed": 5, "draws": 1}  # plain ints: no generator state of any device type
    b = EpisodeSampler(labelled_classes, "train", 3, 1, 2, "cpu", seed=0, rotate=True)
    b.load_state(torch.load(_roundtrip(state), weights_only=True))
    assert torch.equal(a.sample(4).x_query, b.sample(4).x_query)
    with pytest.raises(MetarunError, match="not a metarun sampler state"):
        b.load_state(torch.zeros(16, dtype=torch.uint8))  # a raw (CUDA-sized) generator state


def _roundtrip(obj):
    import io

    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return buf


@pytest.fixture
def labelled_classes():
    from helpers import labelled_classes as make

    return make()


def test_fixed_tasks_depend_only_on_seed_split_and_shape(labelled_classes):
    def tasks(n, chunk):
        eps = list(fixed_tasks(labelled_classes, "val", 3, 1, 2, "cpu", n, 7, chunk))
        assert [len(e.x_support) for e in eps] == [min(chunk, n - i) for i in range(0, n, chunk)]
        return torch.cat([e.x_support for e in eps]), torch.cat([e.y_query for e in eps])

    whole = tasks(10, 10)
    for chunk in (1, 3, 7):
        assert all(torch.equal(a, b) for a, b in zip(tasks(10, chunk), whole, strict=True))
    assert torch.equal(tasks(4, 3)[0], whole[0][:4])  # the first 4 of 10 tasks are the 4 tasks
    assert not torch.equal(
        torch.cat(
            [e.x_support for e in fixed_tasks(labelled_classes, "val", 3, 1, 2, "cpu", 10, 8, 10)]
        ),
        whole[0],
    )
