"""Building objects from config (`_target_: module.Class`) with errors a user can act on."""

from __future__ import annotations

from typing import Any

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from lab.errors import LabError


def build(cfg: DictConfig, what: str, *args: Any, **kwargs: Any) -> Any:
    """`hydra.utils.instantiate(cfg, *args, **kwargs)`; a bad target or argument becomes a `LabError`."""
    try:
        return instantiate(cfg, *args, **kwargs)
    except Exception as e:  # noqa: BLE001 - a config typo must end in one line, not a traceback
        cause = e.__cause__ or e
        detail = " ".join(str(cause).split())[:400]
        raise LabError(f"cannot build the {what} from {OmegaConf.to_container(cfg)}: {detail}") from None
