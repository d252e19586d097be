"""The algorithms metarun holds, by the name `algorithm=NAME` chooses (conf/algorithm/NAME.yaml)."""

from __future__ import annotations

from metarun.errors import MetarunError


def registry() -> dict:
    """{name: class}; each class has from_config(cfg, model, engine)."""
    from metarun.algorithms.anil import ANIL
    from metarun.algorithms.joint import Joint
    from metarun.algorithms.maml import MAML
    from metarun.algorithms.mamlpp import MAMLPlusPlus
    from metarun.algorithms.metasgd import MetaSGD
    from metarun.algorithms.pretrain import Pretrain
    from metarun.algorithms.protomaml import ProtoMAML
    from metarun.algorithms.protonet import ProtoNet
    from metarun.algorithms.reptile import Reptile

    return {
        cls.name: cls
        for cls in (
            MAML,
            MetaSGD,
            MAMLPlusPlus,
            ANIL,
            Reptile,
            Pretrain,
            Joint,
            ProtoNet,
            ProtoMAML,
        )
    }


def algorithm_class(name: str):
    known = registry()
    if name not in known:
        raise MetarunError(
            f"unknown algorithm {name!r}: use algorithm=NAME with one of {', '.join(known)}."
        )
    return known[name]
