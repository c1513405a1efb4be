"""The Redis keys of dispatch.

Every key carries the hash tag ``{waybill}``: on Redis Cluster they all live
in one slot, so each script, including the keys it derives per organization
from :data:`PREFIX`, runs on one node unchanged.

``{waybill}:waiting:{org}``  list of the organization's waiting task ids, oldest first
``{waybill}:known``          set of every task id in some waiting list
``{waybill}:ring``           list of organizations with waiting tasks, in serving order
``{waybill}:ring:members``   the same organizations, as a set
``{waybill}:leases``         zset task id -> lease expiry (ms) of every released task
``{waybill}:leases:{org}``   the same, per organization: its ZCARD is its running count
``{waybill}:lease:org``      hash task id -> organization
``{waybill}:ready``          set of released tasks no worker has started yet (the step's room)
``{waybill}:climit``         hash organization -> concurrency limit
``{waybill}:epoch``          present while the state above is whole; gone = Redis lost it
``{waybill}:drain``          hash organization -> "rate:ms", its recent release rate (for Retry-After)
``{waybill}:verify:cursor``  where the sweep's walk over queued tasks goes on
``{waybill}:done:{task}``    pub/sub channel: the task is final (``Prefer: wait``)
"""

from __future__ import annotations

PREFIX = "{waybill}:"
RING = PREFIX + "ring"
RING_MEMBERS = PREFIX + "ring:members"
KNOWN = PREFIX + "known"
LEASES = PREFIX + "leases"
LEASE_ORG = PREFIX + "lease:org"
READY = PREFIX + "ready"
CLIMIT = PREFIX + "climit"
EPOCH = PREFIX + "epoch"
DRAIN = PREFIX + "drain"
VERIFY_CURSOR = PREFIX + "verify:cursor"
DONE_CHANNEL = PREFIX + "done:"
AUTH_FAILURES = PREFIX + "authfail:"


def waiting_key(org_id: str) -> str:
    return f"{PREFIX}waiting:{org_id}"


def leases_key(org_id: str) -> str:
    return f"{PREFIX}leases:{org_id}"
