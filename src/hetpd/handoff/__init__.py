"""KV handoffs between engines: the three boundary pieces driven together.

``hetpd.kv`` says what the bytes mean and where conversion runs, ``hetpd.transfer`` moves them,
``hetpd.ownership`` says who owns every page at every moment. The endpoints here carry out the
ownership layer's effects on a real :class:`~hetpd.engine.engine.Engine` and a real transport;
a worker process (or a test) only shuttles their messages and calls ``tick``/``poll``.
"""

from hetpd.handoff.consumer import ConsumerEndpoint
from hetpd.handoff.endpoint import HandoffEvent
from hetpd.handoff.producer import ProducerEndpoint

__all__ = ["ConsumerEndpoint", "HandoffEvent", "ProducerEndpoint"]
