"""The ClientApp's one mod: Flower's own privacy mods, switched by the experiment
(chapter ``notebooks/08_privacy``, ``book/deployment.md``).

Flower's mods are fixed when a ``ClientApp`` is built, while this project's
``ClientApp`` serves every experiment of a run (and a batch of them in the book). So
``privacy_mod`` reads the experiment of the message (the site's own run config, the
``experiment`` index of the round config) and, for a ``train`` message, hands it to:

* Flower's :func:`~flwr.clientapp.mod.fixedclipping_mod` /
  :func:`~flwr.clientapp.mod.adaptiveclipping_mod` when ``privacy.site_dp`` is
  ``client_fixed`` / ``client_adaptive`` (the server's wrapper sends the norm);
* :func:`medlora_lib.fl.secagg.secagg_client_mod` (Flower's ``secaggplus_mod``) when
  ``privacy.secagg`` is on.

With privacy off (the default) it only calls the next handler: messages and results
are exactly those of an app without it.
"""

from __future__ import annotations

from typing import Any

from flwr.app import Context, Message
from flwr.app.message_type import MessageType

__all__ = ["privacy_mod", "experiment_privacy"]


def experiment_privacy(msg: Message, context: Context) -> Any | None:
    """The ``privacy`` section of the message's experiment (``None``: not readable)."""
    from medlora_lib.config import experiment_of
    from medlora_lib.errors import ConfigError

    index = 0
    for rec in msg.content.config_records.values():
        if "experiment" in rec:
            index = int(rec["experiment"])
            break
    try:
        cfg, _ = experiment_of(dict(context.run_config), index)
    except ConfigError:  # the handler reports it, naming the key
        return None
    return cfg.privacy


def privacy_mod(msg: Message, context: Context, call_next: Any) -> Message:
    """Apply the experiment's client-side privacy mods to a train message."""
    if msg.metadata.message_type != MessageType.TRAIN or msg.has_error():
        return call_next(msg, context)
    p = experiment_privacy(msg, context)
    if p is None or not (p.secagg or p.site_dp.startswith("client_")):
        return call_next(msg, context)
    nxt = call_next
    if p.site_dp == "client_fixed":
        from flwr.clientapp.mod import fixedclipping_mod

        def nxt(m: Message, c: Context, _n: Any = call_next) -> Message:
            return fixedclipping_mod(m, c, _n)

    elif p.site_dp == "client_adaptive":
        from flwr.clientapp.mod import adaptiveclipping_mod

        def nxt(m: Message, c: Context, _n: Any = call_next) -> Message:
            return adaptiveclipping_mod(m, c, _n)

    if p.secagg:
        from medlora_lib.fl.secagg import secagg_client_mod

        return secagg_client_mod(msg, context, nxt)
    return nxt(msg, context)
