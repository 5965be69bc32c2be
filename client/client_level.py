"""The client's half of client-level DP with client-side clipping: Flower's clipping mods.

With ``privacy.client_level.side = 'client'`` the server sends the clipping norm in the train
config and each client clips its own update (new weights minus the weights it received) before
the reply leaves, so the server never sees an unclipped update.  Flower's ``fixedclipping_mod`` and
``adaptiveclipping_mod`` do exactly that; they wrap the train function only (evaluation replies
carry no weights).
"""

from __future__ import annotations

from flwr.clientapp.mod import adaptiveclipping_mod, fixedclipping_mod

from privet.client.flower_door import Mod
from privet.common.config import PrivetConfig

__all__ = ["client_level_mods"]


def client_level_mods(cfg: PrivetConfig) -> list[Mod]:
    """The mods the train function needs for ``cfg``'s client-level DP (none for server-side clipping)."""
    cl = cfg.privacy.client_level
    if not cl.enabled or cl.side != "client":
        return []
    return [fixedclipping_mod if cl.clipping == "fixed" else adaptiveclipping_mod]
