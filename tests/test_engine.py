"""The execution engine (metarun/algorithms/engine.py): `impl=auto` picked by timing without a
trace in the gradient, and the precision settings that need CUDA."""

import pytest
import torch
from helpers import metarun_gradient, random_episodes, reference_gradient, relative_error

from metarun.algorithms.maml import MAML
from metarun.models.conv4 import Conv4


def test_timed_auto_picks_an_impl_and_keeps_the_gradient(caplog):
    """`auto` picked by timing (CUDA's rule; timed_auto=True here): the timing runs leave no trace
    in the gradient, the pick is logged with its timings, and later meta-batches use the picked
    impl."""
    import logging

    from metarun.algorithms.engine import Engine

    model = Conv4(3, filters=6, image_size=16)
    params = model.init_params(torch.Generator().manual_seed(1), dtype=torch.float64)
    ep = random_episodes(tasks=3, way=3, shot=2, query=2)
    expected = reference_gradient(params, ep, 3, 0.4, 2, False, "stride")
    engine = Engine("auto", 1, 0, "cpu", timed_auto=True)
    maml = MAML(model, 0.4, 2, 2, engine=engine)
    with caplog.at_level(logging.INFO, logger="metarun"):
        assert relative_error(metarun_gradient(maml, params, ep), expected) < 1e-8
    assert engine.impl in ("batched", "loop") and engine.choice["impl"] == engine.impl
    assert "algorithm.impl=auto picked" in caplog.text and "ms per meta-batch" in caplog.text
    assert relative_error(metarun_gradient(maml, params, ep), expected) < 1e-8


def test_precision_settings_need_cuda():
    from omegaconf import OmegaConf

    from metarun.algorithms.engine import Engine
    from metarun.errors import MetarunError
    from metarun.runner.setup import apply_precision

    with pytest.raises(MetarunError, match="autocast=bf16 needs device=cuda"):
        Engine("batched", autocast="bf16")
    with pytest.raises(MetarunError, match="need device=cuda"):
        apply_precision(OmegaConf.create({"tf32": True}), torch.device("cpu"))
    apply_precision(OmegaConf.create({"tf32": False, "autocast": "none"}), torch.device("cpu"))
