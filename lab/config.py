"""Building objects from config (`_target_: module.Class`) with errors a user can act on."""

from __future__ import annotations

from typing import Any

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from lab.errors import LabError


def _ceil_div(a: Any, b: Any) -> int:
    """`${ceil_div:a,b}`: how many b-sized steps cover a (e.g. trainer steps from an env-step budget)."""
    if not (isinstance(a, int) and isinstance(b, int)) or a < 0 or b < 1:
        raise LabError(f"ceil_div needs a non-negative and a positive integer, got {a!r} and {b!r}")
    return -(-a // b)


OmegaConf.register_new_resolver("ceil_div", _ceil_div, replace=True)


def build(cfg: DictConfig, what: str, *args: Any, **kwargs: Any) -> Any:
    """`hydra.utils.instantiate(cfg, *args, **kwargs)`; a bad target or argument becomes a `LabError`."""
    try:
        return instantiate(cfg, *args, **kwargs)
    except Exception as e:  # noqa: BLE001 - a config typo must end in one line, not a traceback
        cause = e.__cause__ or e
        if isinstance(cause, LabError):  # the built object's own refusal already says what to do
            raise cause from None
        detail = " ".join(str(cause).split())[:400]
        raise LabError(f"cannot build the {what} from {OmegaConf.to_container(cfg)}: {detail}") from None
